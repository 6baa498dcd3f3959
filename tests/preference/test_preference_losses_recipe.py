"""The new preference losses through their recipes on tiny models: SimPO/ORPO/IPO-avg/KTO are exact under
micro-batching (and KTO under 2 processes), reference-free losses skip π_ref, the first-step values match the
formulas, the KTO data reader, online DPO's pair selection and loop."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.data.formats import load_dataset_file, unpair_preference
from posttrain.errors import ConfigError, DataError
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.dpo import run as run_dpo
from posttrain.recipes.kto import KTOConfig, mismatched
from posttrain.recipes.kto import run as run_kto
from posttrain.recipes.online_dpo import OnlineDPOConfig, preference_pairs
from posttrain.recipes.online_dpo import run as run_online
from posttrain.rewards import REWARDS
from posttrain.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _rows(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = torch.randint(0, 30, (2,), generator=g).tolist()
        extra = " really" * int(torch.randint(0, 4, (1,), generator=g))
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": f"It is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"I{extra} think {a + b + 1}."}]})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _metrics(folder):
    return read_metrics(Path(folder) / "metrics.jsonl")


COMMON = {"model": "tiny", "max_steps": 3, "lr": 1e-3, "max_length": 96, "progress": False, "tensorboard": False,
              "max_grad_norm": 0.0}


@pytest.mark.parametrize("loss", ["simpo", "orpo", "ipo_avg"])
def test_dpo_recipe_new_losses_are_exact_under_micro_batching(tmp_path, loss):
    train = _write(tmp_path / "train.jsonl", _rows())
    finals = []
    for name, mb, accum in (("one", 4, 1), ("split", 2, 2)):
        config = DPOConfig(train_file=str(train), loss=loss, micro_batch_size=mb, grad_accum_steps=accum,
                           output_dir=str(tmp_path / name), **COMMON)
        config.validate()
        summary = run_dpo(config)
        finals.append(_weights(summary["final_dir"]))
        if loss in ("simpo", "orpo"):
            assert summary["ref/kind"] == "none"  # no reference model, no cache
    _same_run(tmp_path, finals)


def _same_run(tmp_path, finals):
    """Same per-step losses (1e-6) and final weights. Weights get 1e-5: AdamW divides by √v, so an element whose
    gradient is ~0 (a token that almost never occurs) turns float-level differences of the split into ~1e-6 steps."""
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], atol=1e-5, rtol=0)
    la = [r["train/loss"] for r in _metrics(tmp_path / "one") if "train/loss" in r]
    lb = [r["train/loss"] for r in _metrics(tmp_path / "split") if "train/loss" in r]
    assert lb == pytest.approx(la, rel=1e-6, abs=1e-6) and len(la) == 3


def test_simpo_first_step_value_and_default_beta(tmp_path):
    """At step 1 the recipe's SimPO loss equals the formula on the batch's own average log-probs."""
    train = _write(tmp_path / "train.jsonl", _rows(4))
    config = load_config(DPOConfig, None, [f"train_file={train}", "loss=simpo", "model=tiny", "max_steps=1",
                                           "micro_batch_size=4", "max_length=96", "progress=false",
                                           "tensorboard=false", f"output_dir={tmp_path / 'run'}"])
    assert config.beta == 2.0 and config.simpo_gamma_beta_ratio == 0.5
    run_dpo(config)
    first = next(r for r in _metrics(tmp_path / "run") if "train/loss" in r)
    from posttrain.data.pairs import encode_pairs, pair_sequences, sequence_batch, sequence_logps, target_count
    from posttrain.models.forward import TokenLogps

    tok = tiny_tokenizer()
    policy = tiny_model(seed=0)  # what model=tiny loads
    pairs, _ = encode_pairs(_rows(4), tok, 96, "mem")
    with torch.no_grad():
        logps = sequence_logps(TokenLogps(policy), sequence_batch(pair_sequences(pairs, [0, 1, 2, 3]),
                                                                  tok.pad_token_id, pack_length=96))
    nc = torch.tensor([target_count(p["chosen"]) for p in pairs], dtype=torch.float64)
    nr = torch.tensor([target_count(p["rejected"]) for p in pairs], dtype=torch.float64)
    logits = 2.0 * logps[:4].double() / nc - 2.0 * logps[4:].double() / nr - 1.0
    assert first["train/loss"] == pytest.approx(float(-torch.nn.functional.logsigmoid(logits).mean()), abs=1e-5)


def test_kto_recipe_is_exact_under_micro_batching_and_reads_pairs(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows())
    finals = []
    for name, mb, accum in (("one", 8, 1), ("split", 4, 2)):
        config = KTOConfig(train_file=str(train), micro_batch_size=mb, grad_accum_steps=accum,
                           output_dir=str(tmp_path / name), **COMMON)
        config.validate()
        finals.append(_weights(run_kto(config)["final_dir"]))
        assert _metrics(tmp_path / name)[0]["data/examples"] == 24  # 12 pairs → 24 unpaired rows
    _same_run(tmp_path, finals)
    first = next(r for r in _metrics(tmp_path / "one") if "train/loss" in r)
    # step 1: π_θ = π_ref, so r = 0 for every example and z_0 = 0: the loss is exactly λ/2 = 0.5
    assert first["train/loss"] == pytest.approx(0.5, abs=1e-6) and first["train/kl"] == 0.0


def test_kto_two_processes_equal_one_process(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows())
    args = [f"train_file={train}", "model=tiny", "max_steps=2", "lr=1e-3", "max_length=96", "progress=false",
            "tensorboard=false", "max_grad_norm=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "posttrain.cli", "kto", *args, "micro_batch_size=4",
                          "grad_accum_steps=2", f"output_dir={tmp_path / 'one'}"], cwd=ROOT, env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29561", "-m", "posttrain.cli", "kto",
                          *args, "micro_batch_size=4", "grad_accum_steps=1", f"output_dir={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    la = [r["train/loss"] for r in _metrics(tmp_path / "one") if "train/loss" in r]
    lb = [r["train/loss"] for r in _metrics(tmp_path / "two") if "train/loss" in r]
    assert lb == pytest.approx(la, abs=1e-6)


def test_kto_mismatched_pairs_shift_completions_by_one():
    examples = [{"prompt_ids": [i], "completion_ids": [10 + i]} for i in range(3)]
    seqs = mismatched(examples, [2, 0, 1], max_length=8)
    assert [s["input_ids"] for s in seqs] == [[2, 10], [0, 11], [1, 12]]
    assert all(s["loss_mask"] == [0, 1] for s in seqs)


def test_unpaired_data_reader_and_errors(tmp_path):
    good = _write(tmp_path / "u.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                         {"prompt": "Hi", "completion": "Go away.", "label": False}])
    rows, fmt = load_dataset_file(good, "kto")
    assert fmt == "unpaired_preference" and [r["label"] for r in rows] == [True, False]
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                        {"prompt": "Hi", "completion": "Hey", "label": "yes"}])
    with pytest.raises(DataError, match=r"row 2, column 'label'.*true.*false"):
        load_dataset_file(bad, "kto")
    with pytest.raises(DataError, match="'prompt', 'completion' and 'label'"):
        load_dataset_file(_write(tmp_path / "t.jsonl", [{"text": "x"}]), "kto")
    # SFT still reads prompt/completion rows that happen to carry a 'label' column
    assert load_dataset_file(good, "sft")[1] == "prompt_completion"
    pairs = unpair_preference(_rows(2))
    assert [r["label"] for r in pairs] == [True, False, True, False]
    assert pairs[1]["completion"] == _rows(2)[0]["rejected"]
    # the CLI exits with status 2 and writes nothing
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "kto", f"train_file={bad}", "model=tiny",
                          f"output_dir={tmp_path / 'never'}"], cwd=ROOT, check=False, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "column 'label'" in out.stderr and not (tmp_path / "never").exists()


def test_online_dpo_pairs_drop_ties_and_pick_the_higher_reward():
    chosen, rejected = preference_pairs(torch.tensor([0.0, 1.0, 0.5, 0.5, 2.0, -1.0]))
    assert chosen == [1, 4] and rejected == [0, 5]


LETTERS = set("abcdefghijklmnopqrstuvwxyz")


def test_online_dpo_loop_learns_a_reward(tmp_path, monkeypatch):
    monkeypatch.setitem(REWARDS, "letters", lambda: (
        lambda prompts, completions, **kw: [sum(c in LETTERS for c in x) / max(len(x), 1) for x in completions]))
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(16)])
    config = OnlineDPOConfig(train_file=str(prompts), model="tiny", rewards=["letters"], max_steps=20,
                             prompts_per_step=8, max_new_tokens=8, lr=1e-2, beta=0.1, temperature=1.0,
                             output_dir=str(tmp_path / "run"), progress=False, tensorboard=False, eval_size=0)
    config.validate()
    run_online(config)
    rows = [r for r in _metrics(tmp_path / "run") if "reward/mean" in r]
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.1, (first, last)
    trained = [r for r in rows if "train/loss" in r]
    assert trained[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # π_θ = π_ref at step 1
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(OnlineDPOConfig, None, ["task=chain_sum"])


def test_online_dpo_with_a_saved_reward_model(tmp_path):
    """reward_model= a `posttrain reward`-style folder: every kept pair's chosen answer scores higher under it."""
    from posttrain.models.reward_model import build_reward_model

    rm, rm_tok = build_reward_model("tiny")
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": f"Say something #{i}"} for i in range(8)])
    config = OnlineDPOConfig(train_file=str(prompts), model="tiny", reward_model=str(tmp_path / "rm"), max_steps=2,
                             prompts_per_step=4, max_new_tokens=6, lr=1e-3, output_dir=str(tmp_path / "run"),
                             progress=False, tensorboard=False, eval_size=0)
    config.validate()
    run_online(config)
    rows = [r for r in _metrics(tmp_path / "run") if "reward/chosen_mean" in r]
    assert rows and all(r["reward/chosen_mean"] > r["reward/rejected_mean"] for r in rows)
    assert all(r["pairs/kept_frac"] == 1.0 for r in rows)  # a real-valued judge never ties
