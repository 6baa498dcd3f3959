"""report_to: TensorBoard, wandb (offline, no network) and trackio receive the config, every step's metrics and the
final summary; an unknown or missing tracker is refused before anything loads; a run ends with a paragraph naming
final/."""

import glob
import json
import os
import struct
import sys
import time
import types
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.recipes.sft import SFTConfig, run
from posttrain.train.logging import MetricsLogger, read_metrics

STEPS = [(1, {"train/loss": 2.5, "train/lr": 0.1, "note": "text is kept out of trackers"}), (2, {"train/loss": 1.25})]
SUMMARY = {"train/loss": 1.25, "final_dir": "runs/x/final"}


def _log_two_steps(tmp_path, report_to):
    logger = MetricsLogger(tmp_path / "out", report_to=report_to, config={"lr": 0.1, "reward": print})
    for step, metrics in STEPS:
        logger.log(step, metrics)
    logger.close(SUMMARY)
    return tmp_path / "out"


def test_tensorboard_gets_scalars_config_and_summary(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _log_two_steps(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.25)]
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert '"lr": 0.1' in texts["config/text_summary"] and "runs/x/final" in texts["summary/text_summary"]
    assert read_metrics(out / "metrics.jsonl")[0]["note"] == "text is kept out of trackers"


def _wandb_records(run_file):
    """The records of an offline wandb run file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_wandb_offline_gets_history_config_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the test extra; install it with `pip install -e .[test]`")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = _log_two_steps(tmp_path, ["wandb"])
    [run_file] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.time() + 30  # wandb's service process may still be writing the records after finish()
    while os.path.getsize(run_file) <= 7 and time.time() < deadline:
        time.sleep(0.2)
    records = _wandb_records(run_file)

    def items(update):
        return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 2.5), (2, 1.25)]
    assert all("note" not in h for h in history)
    [config] = [items(r.run.config.update) for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert config["lr"] == 0.1 and "built-in function print" in config["reward"]
    summaries = [items(r.summary.update) for r in records if r.WhichOneof("record_type") == "summary"]
    assert any(s.get("final_dir") == "runs/x/final" for s in summaries)


class _FakeTrackio(types.ModuleType):
    """Records calls with trackio's signatures: init(project, name, config, ...), log(metrics, step), finish()."""

    def __init__(self):
        super().__init__("trackio")
        self.calls = []

    def init(self, project, name=None, config=None, embed=True, **kw):
        self.calls.append(("init", project, name, config))

    def log(self, metrics, step=None):
        self.calls.append(("log", step, dict(metrics)))

    def finish(self):
        self.calls.append(("finish",))


def test_trackio_adapter_calls(tmp_path, monkeypatch):
    fake = _FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setattr("posttrain.train.trackers.importlib.util.find_spec", lambda name: object())
    _log_two_steps(tmp_path, ["trackio"])
    assert fake.calls[0][:3] == ("init", "posttrain", "out") and fake.calls[0][3]["lr"] == 0.1
    assert fake.calls[1:3] == [("log", 1, {"train/loss": 2.5, "train/lr": 0.1}), ("log", 2, {"train/loss": 1.25})]
    assert fake.calls[3] == ("log", 2, {"summary/train/loss": 1.25}) and fake.calls[4] == ("finish",)


def test_trackio_real_library(tmp_path, monkeypatch):
    """Runs where trackio is installed (`pip install trackio==0.43.0`; it pins an older pillow, so it is not in the
    test extra); the adapter test above covers the calls everywhere."""
    pytest.importorskip("trackio", reason="trackio is optional: pip install trackio==0.43.0")
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "posttrain-test")
    import importlib

    import trackio.utils

    monkeypatch.setattr(trackio.utils, "TRACKIO_DIR", tmp_path / "trackio")
    importlib.reload(sys.modules["trackio.sqlite_storage"]) if "trackio.sqlite_storage" in sys.modules else None
    _log_two_steps(tmp_path, ["trackio"])
    dbs = glob.glob(str(tmp_path / "trackio" / "*.db"))
    assert dbs, "trackio wrote no database"
    with sqlite3.connect(dbs[0]) as db:
        rows = db.execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    logged = [(step, json.loads(m).get("train/loss")) for step, m in rows]
    assert (1, 2.5) in logged and (2, 1.25) in logged


def test_unknown_or_missing_tracker_is_refused_before_loading(monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        SFTConfig(train_file="x.jsonl", report_to=["mlflow"])
    monkeypatch.setattr("posttrain.train.trackers.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"trackio is not installed; run `pip install trackio==0.43.0`"):
        SFTConfig(train_file="x.jsonl", report_to=["trackio"])
    SFTConfig(train_file="x.jsonl", report_to=["none"])  # none needs nothing


def test_a_run_logs_its_config_and_summary_and_ends_with_a_paragraph(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    summary = run(SFTConfig(train_file=str(data), model="tiny", max_steps=2, micro_batch_size=4, max_length=32,
                            progress=False, output_dir=str(tmp_path / "sft")))
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    summary_text = events.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert summary["final_dir"] in summary_text
    assert '"max_steps": 2' in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    err = capsys.readouterr().err
    assert "posttrain sft: done." in err and f"The trained model is in {summary['final_dir']}" in err
    assert "train/loss" in err and (tmp_path / "sft" / "run_config.json").is_file()
