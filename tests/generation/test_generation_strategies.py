"""Decoding strategies: each decoder returns [B][G] completions with consistent cost figures, and plugs into the
test-time selection strategies through GenerateFn."""

import pytest
import torch

from posttrain.generation.sampler import HFGenerator, SamplingParams, encode_prompts
from posttrain.generation.strategies import DECODERS, DecodeOptions, GenerateFn
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.ttc.best_of_n import majority_of_n


@pytest.fixture(scope="module")
def setup():
    model = tiny_model(seed=3, init_std=0.25)
    tok = tiny_tokenizer()
    return model.eval(), tok, encode_prompts(tok, ["one", "two two", "three three three"])


OPTIONS = DecodeOptions(max_new_tokens=6, temperature=0.8, top_k=7, top_p=0.7, alpha=3.0, block_size=3,
                        mcmc_steps=2, beam_width=3, batch_size=2, seed=11)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoders_return_b_by_g_completions_with_their_cost(setup, name):
    model, tok, prompts = setup
    out = DECODERS[name](model, tok, prompts, 2, OPTIONS)
    assert len(out.texts) == len(out.token_ids) == len(out.token_logps) == 3
    for texts, ids, logps in zip(out.texts, out.token_ids, out.token_logps):
        assert len(texts) == len(ids) == len(logps) == 2
        for t, i, lp in zip(texts, ids, logps):
            assert 1 <= len(i) <= 6 and len(lp) == len(i) and t == tok.decode(i, skip_special_tokens=True)
            assert all(v <= 1e-6 for v in lp)
    prompt_tokens = sum(len(p) for p in prompts)
    assert out.forward_tokens >= prompt_tokens  # every prompt is encoded at least once
    if name in ("greedy", "temperature", "top_k", "top_p", "low_temperature"):
        # the sampler encodes each prompt once and feeds every generated token but the last
        copies = 1 if name == "greedy" else 2
        assert out.forward_tokens == prompt_tokens + sum(len(i) - 1 for row in out.token_ids for i in row[:copies])


def test_low_temperature_decoder_is_the_sampler_at_one_over_alpha(setup):
    model, tok, prompts = setup
    out = DECODERS["low_temperature"](model, tok, prompts[:2], 2, OPTIONS)
    ref = HFGenerator(model, tok).generate(prompts[:2], SamplingParams(max_new_tokens=6, temperature=1 / 3.0,
                                                                       seed=11), n=2)
    assert [t for row in out.token_ids for t in row] == ref.token_lists()


def test_top_k_decoder_only_draws_inside_the_top_k(setup):
    model, tok, prompts = setup
    out = DECODERS["top_k"](model, tok, prompts, 2, OPTIONS)
    for b, row in enumerate(out.token_ids):
        for ids in row:
            context = prompts[b]
            for token in ids:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([context])).logits[0, -1]
                assert token in torch.topk(logits, 7).indices.tolist()
                context = context + [token]


def test_generate_fn_plugs_into_majority_vote(setup):
    model, tok, _ = setup
    texts = [tok.decode(p) for p in encode_prompts(tok, ["one", "two two"])]
    generate = GenerateFn(model, tok, "temperature", OPTIONS)
    results = majority_of_n(texts, generate, n=4, extract=lambda t: t[:1] or None)
    assert len(results) == 2 and all(len(r.candidates) == 4 for r in results)
    assert generate.last is not None and generate.forward_tokens == generate.last.forward_tokens
    for r in results:
        firsts = [c.text[:1] or None for c in r.candidates]
        assert firsts.count(r.answer) == max(firsts.count(a) for a in firsts if a is not None)
