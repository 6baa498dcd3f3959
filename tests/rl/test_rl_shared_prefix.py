"""Shared-prefix packing of rollouts: each prompt runs once for its samples, and nothing else changes.

The packing is checked by hand on a 2-prompt layout; then log-probs, entropies and gradients from the packed forward
must equal the per-sample forward (float64 values to 1e-10; gradients
to float32 precision, see below), for sdpa and eager attention, for micro-batches that split a
group, and a short GRPO run must end with the same weights either way.
"""

import json

import pytest
import torch

from posttrain.data.collate import pack_shared_prefix
from posttrain.generation.rollout import rollout_sequences
from posttrain.generation.sampler import HFGenerator, SamplingParams
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.forward import TokenLogps
from posttrain.recipes.grpo import GRPOConfig, run
from posttrain.rewards import REWARDS
from posttrain.train.logging import read_metrics


def test_pack_shared_prefix_by_hand():
    # rows: prompt [5, 6] + [7, 8]; prompt [5, 6] + [9]; prompt [4] + [3, 2, 1]   (per-sample layout, L = 4, pad 0)
    input_ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [4, 3, 2, 1]])
    packed = pack_shared_prefix(input_ids, torch.tensor([2, 2, 1]), torch.tensor([2, 1, 3]), pad_id=0)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    S = 5
    # the first completion's tokens 7, 8 are predicted by positions 1 (the prompt's last) and 2 (its own 7); the
    # second completion's 9 by position 1 again; the third row's 3, 2, 1 by positions 0, 1, 2 of packed row 1
    assert packed.src.tolist() == [1, 2, 1, S + 0, S + 1, S + 2]
    assert packed.labels.tolist() == [7, 8, 9, 3, 2, 1]
    L = 4
    assert packed.dst.tolist() == [0 * L + 1, 0 * L + 2, 1 * L + 1, 2 * L + 0, 2 * L + 1, 2 * L + 2]
    attend = packed.attention[0, 0].int().tolist()
    assert attend == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # 7 sees the prompt and itself
        [1, 1, 1, 1, 0],  # 8 sees the prompt and 7
        [1, 1, 0, 0, 1],  # 9 sees the prompt and itself, not the other completion
    ]
    assert packed.attention[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # a pad sees only itself
    assert packed.shape == (3, 4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_logps_and_gradients_equal_per_sample(attn):
    tok = tiny_tokenizer()
    model = tiny_model(seed=5, dtype=torch.float64)
    model.config._attn_implementation = attn
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("hi", "a much longer prompt here", "mid one")]
    rollouts = HFGenerator(model, tok).generate(prompts, SamplingParams(max_new_tokens=7, temperature=1.0, seed=3), n=4)
    batch = rollout_sequences(rollouts, tok.pad_token_id)
    fn = TokenLogps(model, chunk_size=5)
    weights = torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for rows in (slice(0, 12), slice(2, 7)):  # all groups; a micro-batch that splits two groups
        ref = fn(batch.input_ids[rows], batch.labels[rows], batch.position_ids[rows], temperature=0.9, with_entropy=True)
        got = fn.shared_prefix(batch.shared_prefix(rows, pad_id=0), temperature=0.9, with_entropy=True)
        mask = batch.mask[rows]
        # eager attention takes its softmax in float32 (transformers), whose sums run in a length-dependent order
        tol = 1e-10 if attn == "sdpa" else 1e-6
        torch.testing.assert_close(got.logps, ref.logps, atol=tol, rtol=0)
        torch.testing.assert_close(got.entropy * mask, ref.entropy * mask, atol=tol, rtol=0)
        assert (got.logps[~mask] == 0).all()
        params = [p for p in model.parameters()]
        g_ref = torch.autograd.grad((ref.logps * weights[rows]).sum(), params)
        g_got = torch.autograd.grad((got.logps * weights[rows]).sum(), params)
        # Llama's RMSNorm computes in float32 even in a float64 model, so a prompt position's gradient (summed over
        # its samples before that cast in the packed layout, after it per sample) agrees to float32 precision only;
        # the completion positions' gradients agree exactly.
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    packed = batch.shared_prefix(slice(0, 12), pad_id=0)
    real_tokens = int((packed.attention[:, 0].diagonal(dim1=-2, dim2=-1) & (packed.attention[:, 0].sum(-1) > 1)).sum())
    assert packed.input_ids.shape[0] == 3 and packed.input_ids.numel() < batch.input_ids.numel()
    assert real_tokens < int((batch.input_ids != tok.pad_token_id).sum())  # the prompts are run once, not 4 times


def test_grpo_same_weights_with_and_without_shared_prefix(tmp_path, monkeypatch):
    vowels = lambda prompts, completions, **kw: [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]
    monkeypatch.setitem(REWARDS, "vowels", lambda: vowels)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}" + " long" * (i % 3)}) + "\n"
                               for i in range(8)))
    finals = []
    for shared in (True, False):
        config = GRPOConfig(train_file=str(prompts), model="tiny", rewards=["vowels"],
                            output_dir=str(tmp_path / f"run{shared}"), num_generations=4, prompts_per_step=2,
                            max_new_tokens=6, micro_batch_size=3, updates_per_batch=2, kl_coef=0.1, lr=1e-2,
                            max_steps=2, progress=False, tensorboard=False, seed=0, zero_variance_filter=False,
                            shared_prefix=shared)
        run(config)
        finals.append(tiny_state(tmp_path / f"run{shared}" / "final"))
    start = tiny_model(seed=0).state_dict()
    moved = max(float((finals[1][k] - start[k]).abs().max()) for k in finals[1])
    assert moved > 1e-2  # the two steps did change the weights
    # AdamW divides by √v, which turns float32 roundoff in a near-zero gradient entry into up to ~lr of movement, so
    # agreement is asked at 1% of the distance moved rather than at machine precision
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], atol=moved * 1e-2, rtol=0)
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / f"run{shared}" / "metrics.jsonl") if "train/loss" in m]
              for shared in (True, False)]
    assert len(losses[0]) == 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)


def tiny_state(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))
