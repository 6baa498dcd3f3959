"""The rollout engine: log-probs equal a teacher-forced pass, prefix sharing equals separate encoding, greedy equals
HF generate, stop tokens / stop strings end rows, finished rows stop costing compute."""

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from posttrain.generation.logits import filtered_logps, sample_from_logps
from posttrain.generation.sampler import Generator, HFGenerator, SamplingParams, encode_prompts
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.models.forward import TokenLogps
from posttrain.ops.logps import IGNORE_INDEX

PROMPTS = ["hello", "a much longer prompt here", "x"]  # different lengths: exercises left padding


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model(init_std=0.25).eval(), tiny_tokenizer()
    return model, tok, HFGenerator(model, tok), encode_prompts(tok, PROMPTS)


def teacher_forced_logits(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # [T, V]
    return logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]  # [T_c, V] predicting each completion token


def test_generator_protocol(setup):
    assert isinstance(setup[2], Generator)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logps_equal_teacher_forced_pass(setup, temperature):
    model, _, gen, prompts = setup
    r = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=temperature, seed=3,
                                             return_raw_logps=True), n=3)
    assert r.completion_ids.shape == r.logps.shape == r.raw_logps.shape == (9, 12)
    scorer = TokenLogps(model)
    for i, tokens in enumerate(r.token_lists()):
        prompt = prompts[i // 3]
        ids = torch.tensor([prompt + tokens])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(prompt) - 1:-1] = torch.tensor(tokens)
        with torch.no_grad():
            at_t = scorer(ids, labels, temperature=temperature).logps[0, len(prompt) - 1:-1]
            at_1 = scorer(ids, labels).logps[0, len(prompt) - 1:-1]
        torch.testing.assert_close(r.logps[i, :len(tokens)], at_t, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.raw_logps[i, :len(tokens)], at_1, atol=1e-5, rtol=0)
    assert r.logps[r.completion_mask == 0].abs().sum() == 0


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (20, 0.6)])
def test_filtered_logps_equal_hf_warpers_on_teacher_forced_logits(setup, top_k, top_p):
    """With top-k/top-p the log-probs are those of the renormalized filtered distribution, checked against
    transformers' own warpers applied to a teacher-forced forward pass."""
    model, _, gen, prompts = setup
    temperature = 0.9
    r = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                                             seed=11), n=2)
    for i, tokens in enumerate(r.token_lists()):
        z = teacher_forced_logits(model, prompts[i // 2], tokens) / temperature  # [T, V]
        if top_k:
            z = TopKLogitsWarper(top_k)(None, z)
        if top_p < 1:
            z = TopPLogitsWarper(top_p)(None, z)
        ref = torch.log_softmax(z, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert torch.isfinite(ref).all()  # every drawn token lies inside the kept set
        torch.testing.assert_close(r.logps[i, :len(tokens)], ref, atol=1e-5, rtol=0)


def test_filtered_logps_kept_set_matches_hf_warpers():
    z = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(7, 1.0), (0, 0.5), (0, 0.95), (10, 0.7)]:
        ours = filtered_logps(z, temperature=0.8, top_k=top_k, top_p=top_p)
        ref = z / 0.8
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        torch.testing.assert_close(ours, torch.log_softmax(ref, -1))
        torch.testing.assert_close(ours.exp().sum(-1), torch.ones(64))


def test_inverse_cdf_draws_follow_the_distribution():
    """With M evenly spaced uniforms, token v is drawn M·q(v) ± 1 times; excluded tokens never."""
    logps = torch.log(torch.tensor([[0.1, 0.0, 0.25, 0.4, 0.25]]))  # token 1 has probability 0
    M = 1000
    u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
    draws = sample_from_logps(logps.expand(M, -1), u)
    counts = torch.bincount(draws, minlength=5).tolist()
    assert counts[1] == 0
    for v, q in enumerate([0.1, 0.0, 0.25, 0.4, 0.25]):
        assert abs(counts[v] - M * q) <= 1


def test_prefix_sharing_equals_encoding_each_copy_separately(setup):
    _, _, gen, prompts = setup
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    shared = gen.generate(prompts, params, n=4)
    copies = gen.generate([p for p in prompts for _ in range(4)], params, n=1)
    assert shared.token_lists() == copies.token_lists()
    torch.testing.assert_close(shared.logps, copies.logps, atol=1e-5, rtol=0)
    # the G copies are not all identical: the prompt is shared, the noise is not
    assert len({tuple(t) for t in shared.token_lists()[:4]}) > 1
    # each prompt was encoded once instead of G times
    assert shared.prefill_tokens * 4 == copies.prefill_tokens == 4 * sum(len(p) for p in prompts)


def test_greedy_equals_hf_generate(setup):
    model, tok, gen, prompts = setup
    r = gen.generate(prompts, SamplingParams(max_new_tokens=15, temperature=0.0))
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=15,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for i, tokens in enumerate(r.token_lists()):
        hf = out[i, P:].tolist()
        assert tokens == hf[:len(tokens)]
        if r.finish_reasons[i] == "eos":
            assert tokens[-1] == tok.eos_token_id
    # greedy log-probs are the temperature-1 log-probs of the argmax tokens
    z = teacher_forced_logits(model, prompts[0], r.token_lists()[0])
    torch.testing.assert_close(r.logps[0, :r.lengths[0]], torch.log_softmax(z, -1).max(-1).values, atol=1e-5, rtol=0)


def test_stop_token_ends_row_and_finished_rows_leave_the_batch(setup):
    _, _, gen, prompts = setup
    free = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    stop_tok = free.token_lists()[1][4]  # row 1 emits this token at step 4 (or earlier)
    r = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(stop_tok,)))
    for i, (full, got) in enumerate(zip(free.token_lists(), r.token_lists())):
        cut = full.index(stop_tok) + 1 if stop_tok in full else len(full)
        assert got == full[:cut]  # identical up to and including the stop token; other rows unaffected
        assert r.finish_reasons[i] == ("eos" if stop_tok in full else "length")
    assert r.finish_reasons[1] == "eos" and r.lengths[1] <= 5
    # a row is fed to the model once per generated token except its last one, and never after it finished
    assert r.decode_tokens == sum(n - 1 for n in r.lengths)
    assert r.forward_tokens == sum(len(p) for p in prompts) + r.decode_tokens


def test_stop_string_cuts_text_and_ends_row(setup):
    _, tok, gen, prompts = setup
    free = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    text0 = free.texts[0]
    stop = text0[5:7]  # two characters of row 0's greedy text
    assert stop and stop in text0
    r = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0, stop=(stop,)))
    assert r.finish_reasons[0] == "stop_string"
    assert r.texts[0] == text0[:text0.find(stop)]
    # the token ids end with the token that completed the stop string: the text of one token fewer lacks it
    tokens = r.token_lists()[0]
    assert stop in tok.decode(tokens) and stop not in tok.decode(tokens[:-1])
    assert tokens == free.token_lists()[0][:len(tokens)]


def test_seeded_runs_repeat_and_differ_across_seeds(setup):
    _, _, gen, prompts = setup
    a = gen.generate(prompts, SamplingParams(max_new_tokens=8, seed=1), n=2)
    b = gen.generate(prompts, SamplingParams(max_new_tokens=8, seed=1), n=2)
    c = gen.generate(prompts, SamplingParams(max_new_tokens=8, seed=2), n=2)
    assert a.token_lists() == b.token_lists() and a.token_lists() != c.token_lists()


def test_bad_params_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
