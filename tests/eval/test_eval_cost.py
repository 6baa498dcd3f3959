"""Every strategy reports its cost in one unit: tokens forwarded through the policy and wall time (issue: matched
compute). Checked on the tiny model through `evaluate`, and for the selection strategies' own results."""

import json

import pytest

from posttrain.eval.runner import STRATEGIES, evaluate
from posttrain.eval.tasks import JsonlTask
from posttrain.generation.strategies import DecodeOptions, GenerateFn
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.ttc.best_of_n import best_of_n, majority_of_n


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(2)))
    task = JsonlTask(path, extract="last_number")
    return tiny_model(seed=2, init_std=0.25).eval(), tiny_tokenizer(), task


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "best_of_n_reward"])
def test_every_strategy_reports_forward_tokens_and_wall_time(setup, strategy):
    model, tok, task = setup
    problems = task.problems(2, 0)
    options = DecodeOptions(max_new_tokens=4, batch_size=2, block_size=2, mcmc_steps=1, lookahead_top_k=2,
                            lookahead_rollouts=2, lookahead_horizon=2, beam_width=2)
    m = evaluate(model, tok, task, problems, strategy, options=options, num_samples=2)["metrics"]
    prompt_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in _texts(tok, problems))
    assert m["forward_tokens"] >= prompt_tokens  # every prompt is encoded at least once
    assert m["wall_s_per_problem"] > 0
    assert m["forward_per_output_token"] > 0


def _texts(tok, problems):
    from posttrain.data.tokenize import prompt_text

    return [prompt_text(tok, p.prompt) for p in problems]


def test_selection_results_carry_the_generators_forward_tokens(setup):
    model, tok, task = setup
    texts = _texts(tok, task.problems(2, 0))
    generate = GenerateFn(model, tok, "temperature", DecodeOptions(max_new_tokens=4))
    for results in (majority_of_n(texts, generate, n=3), best_of_n(texts, generate, lambda p, c: [0.0] * len(c), n=3)):
        assert sum(r.forward_tokens for r in results) == pytest.approx(generate.last.forward_tokens)
        assert all(r.wall_s > 0 for r in results)


def test_particles_with_a_saved_reward_model(setup, tmp_path):
    """Particle filtering scored by a reward model saved the way `posttrain reward` saves it: every particle is
    scored once per step it takes, and the chosen particle is one of the final ones."""
    import torch

    from posttrain.models.reward_model import build_reward_model

    model, tok, task = setup
    rm, rm_tok = build_reward_model("tiny")
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=torch.Generator().manual_seed(0)))
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    problems = task.problems(2, 0)
    out = evaluate(model, tok, task, problems, "particles", options=DecodeOptions(max_new_tokens=6, seed=1),
                   num_samples=3, reward_model=str(tmp_path / "rm"), keep_samples=True, step_tokens=2)
    m = out["metrics"]
    assert 2 * 3 <= m["scored_texts"] <= 2 * 3 * 6  # each particle: one score per step, 1 to 6 steps
    assert all(r["selected"] in range(3) for r in out["problems"])
    assert m["strategy"].startswith("particles")
