"""One run per output folder, damage-proof resume, Ctrl-C checkpoints, disk full and unwritable folders."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from posttrain.train import checkpoint as ckpt
from posttrain.train.checkpoint import list_checkpoints
from posttrain.train.logging import MetricsLogger, read_metrics
from posttrain.train.run_dir import open_run


def _steps(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def test_a_second_live_run_into_the_same_folder_is_refused(rb, tmp_path, capsys):
    data = rb.sft_data(tmp_path)
    out = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # another live run holding the folder
        try:
            open_run(out, resume=None)
            os.write(ready_w, b"locked")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 16) == b"locked"
        assert rb.sft(data, out, "max_steps=2") == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {holder})" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the second run was written
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.close(ready_r)
        os.close(ready_w)
    assert rb.sft(data, out, "max_steps=2") == 0  # the kernel released the dead holder's lock


def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(rb, tmp_path, capsys):
    data = rb.sft_data(tmp_path)
    out = tmp_path / "run"
    assert rb.sft(data, out, "max_steps=6", "save_steps=2", "keep_last=0") == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert rb.sft(data, out, "max_steps=2", "save_steps=1") == 2  # a new run with fewer steps: would prune others
    assert "holds another run (checkpoints up to step-00000006 and a final/ folder)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert rb.sft(data, out, "max_steps=2", "save_steps=1", "overwrite=true") == 0
    assert _steps(out) == ["step-00000001", "step-00000002"]  # the old run's step 4 and 6 are gone
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 2


def test_resume_without_a_checkpoint_says_so_and_writes_nothing(rb, tmp_path, capsys):
    assert rb.sft(rb.sft_data(tmp_path), tmp_path / "new", "max_steps=2", "--resume") == 2
    assert "no intact checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_resume_falls_back_past_a_truncated_checkpoint_and_a_damaged_log(rb, tmp_path, caplog):
    data = rb.sft_data(tmp_path)
    args = ("max_steps=6", "save_steps=2", "keep_last=0")
    assert rb.sft(data, tmp_path / "ref", *args) == 0
    out = tmp_path / "run"
    assert rb.sft(data, out, "max_steps=4", "save_steps=2", "keep_last=0") == 0  # same schedule: lr is constant
    shutil.rmtree(out / "final")
    newest = out / "checkpoints" / "step-00000004" / "model" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a line cut by a kill
    assert rb.sft(data, out, *args, "--resume") == 0
    assert "step-00000004 is damaged (model/model.safetensors has" in caplog.text
    assert rb.same_weights(tmp_path / "ref" / "final", out / "final")  # resumed from step 2, bit-identical
    rows = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert rows == [1, 2, 3, 4, 5, 6]


def test_temporary_and_half_deleted_folders_are_cleaned_at_start(rb, tmp_path):
    data = rb.sft_data(tmp_path)
    out = tmp_path / "run"
    assert rb.sft(data, out, "max_steps=2", "save_steps=1", "keep_last=0") == 0
    ckdir = out / "checkpoints"
    (ckdir / ".step-00000003.tmp-12345").mkdir()  # a checkpoint being written when the run was killed
    (ckdir / ".step-00000003.tmp-12345" / "model").mkdir()
    shutil.copytree(ckdir / "step-00000001", ckdir / ".step-00000001.deleting")  # killed while pruning
    (out / ".final.tmp-999").mkdir()
    (out / ".config.json.tmp-999").write_text("{")
    # a replace interrupted between its renames: the complete old folder sits under the .old name
    os.replace(ckdir / "step-00000002", ckdir / ".step-00000002.old-4242")
    assert rb.sft(data, out, "max_steps=3", "save_steps=1", "keep_last=0", "--resume") == 0
    left = sorted(p.name for p in ckdir.iterdir())
    assert left == ["step-00000001", "step-00000002", "step-00000003"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".deleting" in p.name or ".old-" in p.name]


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(rb, tmp_path, monkeypatch, capsys):
    data = rb.sft_data(tmp_path)
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(ckpt.STATE_FILE):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    assert rb.sft(data, out, "max_steps=4", "save_steps=1") == 2
    assert "no space left on device" in capsys.readouterr().err
    assert _steps(out) == ["step-00000001"]  # the previous checkpoint is intact
    assert ckpt.checkpoint_problem(out / "checkpoints" / "step-00000001") is None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk(rb, tmp_path, capsys):
    data = rb.sft_data(tmp_path)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # a tiny model's checkpoint is ~1.3 MB: the first fits in 2 MB, the second does not
        code = rb.sft(data, mnt / "run", "max_steps=3", "save_steps=1", "keep_last=0", "model=tiny:hidden=64")
        err = capsys.readouterr().err
        assert code == 2 and "no space left on device" in err, err
        steps = _steps(mnt / "run")
        assert steps and all(ckpt.checkpoint_problem(mnt / "run" / "checkpoints" / s) is None for s in steps)
        assert not [p for p in (mnt / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("where", ["under_file", "read_only", "proc"])
def test_an_unwritable_output_folder_is_a_clear_error(rb, tmp_path, capsys, where):
    data = rb.sft_data(tmp_path)
    if where == "under_file":
        out = data / "run"
    elif where == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "run"
    else:
        out = Path("/proc/posttrain-run")
    assert rb.sft(data, out, "max_steps=2") == 2
    assert "cannot write to" in capsys.readouterr().err


def test_metrics_logger_drops_a_truncated_last_line_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    MetricsLogger(tmp_path, tensorboard=False, start_step=2).log(3, {"a": 3})
    assert read_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}, {"step": 3, "a": 3}]
    assert "line 3 is damaged" in caplog.text


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(rb, tmp_path):
    data = rb.sft_data(tmp_path)
    steps = ["max_steps=40", "save_steps=0", "logging_steps=1"]
    assert rb.sft(data, tmp_path / "ref", *steps) == 0  # also: the fork below starts with everything imported
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    (pid,) = rb.start_runs(["sft", f"train_file={data}", *rb.sft_common, *steps, f"output_dir={out}"], log, False)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out / "metrics.jsonl")) < 3:
        assert time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)
    os.kill(pid, signal.SIGINT)
    assert rb.wait_runs([pid]) == 130, log.read_text()[-2000:]
    assert "interrupted; stopped after step" in log.read_text()
    saved = _steps(out)
    assert len(saved) == 1 and not (out / "final").exists()
    step = int(saved[0].split("-")[1])
    assert 0 < step < 40 and step == max(r["step"] for r in read_metrics(out / "metrics.jsonl"))
    assert rb.sft(data, out, *steps, "--resume") == 0
    assert rb.same_weights(tmp_path / "ref" / "final", out / "final")


def test_open_run_refuses_and_cleans_consistently(tmp_path):
    run = open_run(tmp_path / "x", resume=None)
    try:
        with pytest.raises(Exception, match="in use by another run"):
            open_run(tmp_path / "x", resume=None)
    finally:
        run.close()
    assert not (tmp_path / "x").exists()  # created, never written: removed again
    (tmp_path / "y" / "checkpoints" / "step-00000001").mkdir(parents=True)
    (tmp_path / "y" / "checkpoints" / "step-00000001" / ckpt.STATE_FILE).write_bytes(b"junk")
    with pytest.raises(Exception, match="no intact checkpoint"):
        open_run(tmp_path / "y", resume="latest")
    assert json.dumps(sorted(p.name for p in (tmp_path / "y").iterdir())) == json.dumps([".lock", "checkpoints"])


def test_a_truncated_model_is_caught_even_without_a_manifest(rb, tmp_path):
    out = tmp_path / "run"
    assert rb.sft(rb.sft_data(tmp_path), out, "max_steps=1", "save_steps=1") == 0
    folder = list_checkpoints(out)[-1]
    assert ckpt.checkpoint_problem(folder) is None
    (folder / ckpt.MANIFEST_FILE).unlink()  # as an older checkpoint, with no list of sizes
    model = folder / "model" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    assert ckpt.checkpoint_problem(folder) == "model/model.safetensors is truncated (its tensors end past the end " \
                                              "of the file)"
