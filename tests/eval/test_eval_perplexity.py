"""Perplexity on a text / chat file (eval.metrics.perplexity, eval.perplexity, `posttrain eval perplexity_file=`)
against a direct log-softmax reference, with hand-counted target tokens."""

import json
import math

import numpy as np
import pytest
import torch

from posttrain.data.tokenize import encode_sft
from posttrain.errors import DataError
from posttrain.eval.metrics import perplexity
from posttrain.eval.perplexity import file_perplexity
from posttrain.models import tiny_model, tiny_tokenizer


def test_perplexity_by_hand():
    out = perplexity([math.log(0.5), math.log(0.25), -7.0], [1, 1, 0])
    assert out.num_tokens == 2
    assert out.nll == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert out.perplexity == pytest.approx(math.sqrt(8))  # geometric mean of 1/p = (2·4)^½
    assert perplexity([math.log(0.1)] * 4).perplexity == pytest.approx(10.0)
    assert perplexity(np.full((2, 3), -1000.0)).perplexity == math.inf  # overflow is inf, not an error
    with pytest.raises(ValueError, match="zero target"):
        perplexity([-1.0, -2.0], [0, 0])
    with pytest.raises(ValueError, match="non-finite"):
        perplexity([-math.inf, -2.0], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        perplexity([-1.0, -2.0], [1])


@torch.no_grad()
def reference_nll(model, tok, rows, fmt):
    """Σ −log p over target tokens with a plain full-logits forward, one row at a time; and the target count."""
    total, count = 0.0, 0
    for row in rows:
        ex = encode_sft(tok, row, fmt)
        ids = torch.tensor([ex["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # [T, V]
        for t in range(1, len(ex["input_ids"])):
            if ex["loss_mask"][t]:
                total -= float(logp[t - 1, ex["input_ids"][t]])
                count += 1
    return total, count


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_file_perplexity_matches_the_reference(tmp_path, kind):
    model, tok = tiny_model(seed=3).eval(), tiny_tokenizer()
    if kind == "text":
        rows = [{"text": "hello world"}, {"text": "a much longer line of text to pad the batch"}, {"text": "xy"}]
        expected_tokens = sum(len(r["text"].encode()) for r in rows)  # bytes + EOS − the first token
    else:
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey there"}]},
                {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                              {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}]
        expected_tokens = None
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = file_perplexity(model, tok, path, batch_size=2)
    nll, count = reference_nll(model, tok, rows, kind)
    if expected_tokens is not None:
        assert count == expected_tokens
    assert out["num_tokens"] == count and out["num_rows"] == len(rows)
    assert out["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_bad_rows_name_the_file_and_row(tmp_path):
    model, tok = tiny_model(seed=3).eval(), tiny_tokenizer()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txet": "typo"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl"):
        file_perplexity(model, tok, path)


def test_posttrain_eval_reports_perplexity(tmp_path, capsys):
    from posttrain.cli import main

    data = tmp_path / "notes.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    assert main(["eval", "--model", "tiny", f"perplexity_file={data}", f"output_dir={tmp_path}"]) == 0
    metrics = json.loads((tmp_path / "eval_perplexity_notes.json").read_text())["metrics"]
    assert metrics["num_tokens"] == 3 and metrics["perplexity"] > 1
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "--model", "tiny", f"perplexity_file={tmp_path / 'missing.jsonl'}"]) == 2
