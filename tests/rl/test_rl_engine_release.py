"""A GRPO run releases the rollout engine it opened whether it finishes or fails mid-way (a vLLM engine holds its KV
cache, a server its process, until closed)."""

import json
from typing import ClassVar

import pytest

from posttrain.generation import backends
from posttrain.generation.backends import closing_engines
from posttrain.generation.sampler import HFGenerator
from posttrain.recipes import grpo
from posttrain.recipes.grpo import GRPOConfig, run
from posttrain.rewards import REWARDS


class ClosableGenerator(HFGenerator):
    """The torch engine with a close(), as vLLM engines have: records every instance and how often it was closed."""

    made: ClassVar[list["ClosableGenerator"]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed = 0
        ClosableGenerator.made.append(self)

    def close(self):
        """Count the close."""
        self.closed += 1


@pytest.fixture
def closable(monkeypatch):
    ClosableGenerator.made = []
    monkeypatch.setattr(backends, "HFGenerator", ClosableGenerator)
    monkeypatch.setattr(backends, "_open_engines", [])
    # rollout_engine records an engine that needs closing; the HF engine has no close, so register it as vLLM's would be
    real = backends.rollout_engine
    monkeypatch.setattr("posttrain.recipes.grpo.rollout_engine",
                        lambda *a, **k: backends._opened(real(*a, **k)))
    return ClosableGenerator


def _config(tmp_path, **kw):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something #{i}"}) + "\n" for i in range(8)))
    base = dict(train_file=str(prompts), eval_size=0, model="tiny", rewards=["calls"], output_dir=str(tmp_path / "run"),
                num_generations=4, prompts_per_step=2, max_new_tokens=4, micro_batch_size=8, max_steps=3,
                progress=False, tensorboard=False, seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def _letters(monkeypatch):
    monkeypatch.setitem(REWARDS, "calls", lambda: lambda prompts, completions, **kw: [float(i % 2) for i in
                                                                                   range(len(completions))])


def test_a_run_that_fails_mid_way_closes_its_engine(tmp_path, monkeypatch, closable):
    _letters(monkeypatch)
    updates = []
    real_update = grpo._update

    def failing_update(*args, **kwargs):  # step 1 trains, step 2's update raises
        updates.append(1)
        if len(updates) == 2:
            raise RuntimeError("out of memory in the update")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(grpo, "_update", failing_update)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(_config(tmp_path))
    assert len(updates) == 2
    assert [e.closed for e in closable.made if e.closed] == [1]
    assert backends._open_engines == []


def test_a_finished_run_closes_its_engine_once(tmp_path, monkeypatch, closable):
    _letters(monkeypatch)
    run(_config(tmp_path))
    assert [e.closed for e in closable.made if e.closed] == [1]  # closed at the end of the run, not again on exit
    assert backends._open_engines == []


def test_closing_engines_leaves_engines_opened_outside_the_block(monkeypatch):
    monkeypatch.setattr(backends, "_open_engines", [])
    outer, inner = ClosableGenerator.__new__(ClosableGenerator), ClosableGenerator.__new__(ClosableGenerator)
    outer.closed = inner.closed = 0
    backends._opened(outer)
    with pytest.raises(KeyError), closing_engines():
        backends._opened(inner)
        raise KeyError("boom")
    assert (outer.closed, inner.closed) == (0, 1)
    assert backends._open_engines == [outer]
