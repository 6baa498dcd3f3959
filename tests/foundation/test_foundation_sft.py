"""SFT: the loss is a hand-checkable cross-entropy on completion tokens; packing, accumulation, DDP and resume are
all exact."""

import functools
import json
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from posttrain.data.collate import pack_examples, pad_batch
from posttrain.data.order import micro_batches, step_units
from posttrain.data.tokenize import encode_sft
from posttrain.losses.sft import sft_loss
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.forward import TokenLogps
from posttrain.recipes.sft import batch_tensors, padding_free_rows
from posttrain.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _rows(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = torch.randint(0, 50, (2,), generator=g).tolist()
        pad = " please" * int(torch.randint(0, 4, (1,), generator=g))  # variable lengths
        rows.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?{pad}"},
                                  {"role": "assistant", "content": f"Answer: {a + b}"}]})
    return rows


def _examples(rows):
    tok = tiny_tokenizer()
    return [encode_sft(tok, r, "messages") for r in rows], tok


def _loss_and_grads(model, examples, rows, pad_id, num_targets):
    fn = TokenLogps(model, chunk_size=7)
    model.zero_grad()
    total = 0.0
    for group in rows:
        b = batch_tensors(examples, group, pad_id, "cpu")
        out = fn(b["input_ids"], b["labels"], b["position_ids"])
        loss = sft_loss(out.logps, b["labels"] != -100, num_target_tokens=num_targets).loss
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sft_loss_equals_hand_computed_cross_entropy():
    examples, tok = _examples(_rows(3))
    model = tiny_model(seed=1)
    b = batch_tensors(examples, [[0], [1], [2]], tok.pad_token_id, "cpu")
    out = TokenLogps(model, chunk_size=5)(b["input_ids"], b["labels"], b["position_ids"])
    got = sft_loss(out.logps, b["labels"] != -100).loss
    # Reference: plain logits, F.cross_entropy over the next-token targets of assistant tokens only.
    padded = pad_batch(examples, tok.pad_token_id)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    losses, count = [], 0
    for i, ex in enumerate(examples):
        for t in range(1, len(ex["input_ids"])):
            if ex["loss_mask"][t]:
                losses.append(F.cross_entropy(logits[i, t - 1][None], torch.tensor([ex["input_ids"][t]])))
                count += 1
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # the prompt carries no loss: the targets are exactly the assistant answers
    targets = [tok.decode([int(x) for x in row[row != -100]]) for row in b["labels"]]
    assert targets == [f"Answer: {r['messages'][1]['content'].split()[-1]}<|im_end|>\n" for r in _rows(3)]
    assert count == int((b["labels"] != -100).sum())


def test_packed_and_unpacked_give_same_loss_and_gradients():
    examples, tok = _examples(_rows(10))
    n = sum(sum(e["loss_mask"][1:]) for e in examples)
    packed = pack_examples(examples, max_length=120)
    assert len(packed) < len(examples)  # something was actually packed
    model = tiny_model(seed=2)
    # unpacked: one padded batch of 10 rows (one example per row); packed: the packed rows in one batch
    loss_u, grads_u = _loss_and_grads(model, examples, [[[i] for i in range(10)]], tok.pad_token_id, n)
    loss_p, grads_p = _loss_and_grads(model, examples, [packed], tok.pad_token_id, n)
    assert abs(loss_u - loss_p) < 1e-6
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-6, rtol=1e-5, msg=name)


def test_padding_free_rows_hold_each_example_once_and_change_nothing():
    rows = _rows(10)
    rows[3]["messages"][0]["content"] += " and now a much longer question" * 3  # one long example, nine short
    examples, tok = _examples(rows)
    n = sum(sum(e["loss_mask"][1:]) for e in examples)
    padded = [[i] for i in range(10)]
    rows = padding_free_rows(examples, padded)
    longest = max(len(e["input_ids"]) for e in examples)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(sum(len(examples[i]["input_ids"]) for i in r) <= 2 * longest for r in rows)
    assert len(rows) < 10  # some examples share a row
    assert rows == padding_free_rows(examples, list(reversed(padded)))  # the order given does not matter
    model = tiny_model(seed=2)
    loss_u, grads_u = _loss_and_grads(model, examples, [padded], tok.pad_token_id, n)
    loss_f, grads_f = _loss_and_grads(model, examples, [rows], tok.pad_token_id, n)
    assert abs(loss_u - loss_f) < 1e-6
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_accumulation_8x1_equals_1x8():
    examples, tok = _examples(_rows(8))
    rows = [[i] for i in range(8)]
    units = step_units(0, 8, len(rows), seed=0)
    n = sum(sum(e["loss_mask"][1:]) for e in examples)
    model = tiny_model(seed=3)
    big = [[rows[u] for u in mb] for mb in micro_batches(units, 8, 0, 1)]
    small = [[rows[u] for u in mb] for mb in micro_batches(units, 1, 0, 1)]
    assert len(big) == 1 and len(small) == 8
    loss_big, grads_big = _loss_and_grads(model, examples, big, tok.pad_token_id, n)
    loss_small, grads_small = _loss_and_grads(model, examples, small, tok.pad_token_id, n)
    assert abs(loss_big - loss_small) < 1e-5
    for name in grads_big:
        torch.testing.assert_close(grads_small[name], grads_big[name], atol=1e-5, rtol=1e-5, msg=name)


def test_data_order_is_a_pure_function_of_step():
    a = [step_units(s, 5, 12, seed=7) for s in range(6)]
    b = [step_units(s, 5, 12, seed=7) for s in range(6)]
    assert a == b
    flat = functools.reduce(operator.iadd, a, [])
    assert sorted(flat[:12]) == list(range(12))  # the first epoch visits every unit once
    assert micro_batches(list(range(8)), 2, rank=1, world_size=2) == [[2, 3], [6, 7]]


def _write_data(tmp_path, n=24):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed=5)))
    return path


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


COMMON = ["model=tiny", "max_length=96", "lr=3e-3", "warmup_steps=2", "progress=false", "tensorboard=false",
          "logging_steps=1"]


def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path):
    data = _write_data(tmp_path)
    args = [f"train_file={data}", *COMMON, "max_steps=12", "micro_batch_size=2", "grad_accum_steps=2", "save_steps=2"]
    ref = _cli(["sft", *args, f"output_dir={tmp_path / 'ref'}"])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    victim_dir = tmp_path / "victim"
    victim = _cli(["sft", *args, f"output_dir={victim_dir}"])
    deadline = time.time() + 300
    while not (victim_dir / "checkpoints" / "step-00000004").exists():
        assert victim.poll() is None, "run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (victim_dir / "final").exists()  # it really died mid-way
    resumed = _cli(["sft", *args, f"output_dir={victim_dir}", "--resume"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    a, b = _weights(tmp_path / "ref"), _weights(victim_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(victim_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))  # the resumed log reads as one run


def test_ddp_two_processes_equal_one_process(tmp_path):
    data = _write_data(tmp_path, n=16)
    args = [f"train_file={data}", *COMMON, "max_steps=3", "max_grad_norm=0", "packing=false"]
    single = _cli(["sft", *args, "micro_batch_size=2", "grad_accum_steps=2", f"output_dir={tmp_path / 'one'}"])
    assert single.wait(timeout=300) == 0, single.stdout.read()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29533", "-m", "posttrain.cli", "sft",
                          *args, "micro_batch_size=2", "grad_accum_steps=1", f"output_dir={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
    loss_one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "train/loss" in r]
    loss_two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/loss"] for r in loss_two] == pytest.approx([r["train/loss"] for r in loss_one], abs=1e-5)


def test_final_checkpoint_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _write_data(tmp_path, n=8)
    from posttrain.cli import main
    assert main(["sft", f"train_file={data}", *COMMON, "max_steps=2", f"output_dir={tmp_path / 'r'}"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "r" / "final")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")
    w = _weights(tmp_path / "r")
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], w["model.embed_tokens.weight"])
