"""No silent NaN: a step whose loss or gradient norm is NaN/inf changes nothing (parameters, optimizer moments, LR
schedule), is counted and logged; too many in a row stop the run with exit 2; non-finite weights are never saved."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.errors import PosttrainError
from posttrain.train.checkpoint import list_checkpoints, load_state
from posttrain.train.guards import NonFiniteError, NonFiniteGuard, check_finite_weights
from posttrain.train.logging import read_metrics
from posttrain.train.optim import build_optimizer, build_scheduler
from posttrain.train.parallel import clip_grad_norm as grad_norm


def _state(optimizer) -> dict:
    return copy.deepcopy(optimizer.state_dict())


def test_guard_skips_a_nan_step_without_touching_parameters_or_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    guard = NonFiniteGuard(4)

    def step(x: torch.Tensor) -> bool:
        loss = model(x).pow(2).sum()
        loss.backward()
        norm = grad_norm(model.parameters(), 1.0)
        applied = guard.ok(loss, norm)
        if applied:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return applied

    assert step(torch.ones(4, 3))  # one real step: the optimizer now has moments
    params, opt_state, lr = copy.deepcopy(model.state_dict()), _state(optimizer), scheduler.get_last_lr()
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not step(torch.full((4, 3), bad))
    assert all(torch.equal(model.state_dict()[k], params[k]) for k in params)
    after = _state(optimizer)
    for i, s in opt_state["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][i][k], v), k  # exp_avg, exp_avg_sq and the step count
    assert after["param_groups"] == opt_state["param_groups"] and scheduler.get_last_lr() == lr
    assert guard.skipped == 3 and guard.metrics() == {"train/nonfinite_skipped": 1.0, "train/nonfinite_total": 3.0}
    assert step(torch.ones(4, 3))  # a finite step resets the run of skips
    assert guard.consecutive == 0
    for _ in range(3):
        assert not step(torch.full((4, 3), float("nan")))
    with pytest.raises(NonFiniteError, match="4 optimizer steps in a row"):
        step(torch.full((4, 3), float("nan")))


def test_grad_norm_without_clipping_measures_and_leaves_gradients_bit_identical():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0, 1e-3])
    before = p.grad.clone()
    norm = grad_norm([p], 0.0)
    assert torch.equal(p.grad, before)
    assert float(norm) == pytest.approx(math.sqrt(25 + 1e-6))
    p.grad = torch.tensor([float("nan"), 0, 0, 0, 0])
    assert math.isnan(float(grad_norm([p], 0.0)))  # measured even with clipping off


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="weight 'weight'"):
        check_finite_weights([model], "final")
    from posttrain.models import tiny_model, tiny_tokenizer
    from posttrain.train.state import save_final

    tiny = tiny_model()
    with torch.no_grad():
        next(tiny.parameters())[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        save_final(tiny, tiny_tokenizer(), tmp_path / "final")
    assert not (tmp_path / "final").exists() and list(tmp_path.iterdir()) == []


def _nan_at(monkeypatch, module, name: str, steps: set[int]):
    """Make the recipe's loss function return NaN on the given (1-based) calls."""
    original = getattr(module, name)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] in steps:  # every float field NaN: the loss and the sums the recipe logs
            out = type(out)(**{k: v * float("nan") if torch.is_tensor(v) and v.is_floating_point() else v
                               for k, v in out.__dict__.items()})
        return out

    monkeypatch.setattr(module, name, patched)


def test_sft_skips_a_nan_step_exactly(rb, tmp_path, monkeypatch):
    import posttrain.recipes.sft as sft_recipe

    data = rb.sft_data(tmp_path)
    assert rb.sft(data, tmp_path / "two", "max_steps=2", "save_steps=1") == 0
    _nan_at(monkeypatch, sft_recipe, "sft_loss", {3})  # one micro-batch per step: call 3 is step 3
    assert rb.sft(data, tmp_path / "three", "max_steps=3", "save_steps=1", "grad_accum_steps=1") == 0
    # step 3 was skipped: the weights and the optimizer state equal those after step 2 (constant LR schedule)
    assert rb.same_weights(tmp_path / "two" / "final", tmp_path / "three" / "final")
    a = load_state(list_checkpoints(tmp_path / "two")[-1])["optimizer"]["state"]
    b = load_state(list_checkpoints(tmp_path / "three")[-1])["optimizer"]["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    rows = [r for r in read_metrics(tmp_path / "three" / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/nonfinite_skipped"] for r in rows] == [0.0, 0.0, 1.0]
    assert math.isnan(rows[2]["train/loss"]) and rows[2]["train/nonfinite_total"] == 1.0


def test_sft_with_lr_1e6_never_writes_non_finite_weights(rb, tmp_path):
    data = rb.sft_data(tmp_path)
    code = rb.sft(data, tmp_path / "run", "max_steps=8", "save_steps=2", "lr=1e6", "max_nonfinite_steps=3")
    assert code in (0, 2)
    saved = list_checkpoints(tmp_path / "run") + ([tmp_path / "run" / "final"] if code == 0 else [])
    assert saved, "at least one checkpoint was written before the run went bad"
    for folder in saved:
        assert all(torch.isfinite(t).all() for t in rb.weights(folder).values()), folder
    if code == 2:
        assert not (tmp_path / "run" / "final").exists()


def test_sft_stops_after_too_many_nan_steps_in_a_row(rb, tmp_path, monkeypatch, capsys):
    import posttrain.recipes.sft as sft_recipe

    _nan_at(monkeypatch, sft_recipe, "sft_loss", set(range(3, 100)))
    assert rb.sft(rb.sft_data(tmp_path), tmp_path / "run", "max_steps=10", "save_steps=1", "max_nonfinite_steps=3") == 2
    err = capsys.readouterr().err
    assert "NaN/inf in 3 optimizer steps in a row" in err and "at step 5" in err
    assert not (tmp_path / "run" / "final").exists()
    # skipped steps leave the weights as they were (finite), so steps 3 and 4 were still checkpointed
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000004"]
    two = rb.weights(list_checkpoints(tmp_path / "run")[0])
    assert all(torch.isfinite(t).all() for t in two.values())


def test_dpo_skips_nan_steps_and_stops(tmp_path, monkeypatch, capsys):
    import json

    import posttrain.recipes.dpo as dpo_recipe
    from posttrain.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                             for i in range(8)))
    original = dpo_recipe.DPO_LOSSES["sigmoid"]

    def nan_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        return type(out)(**{**out.__dict__, "loss": out.loss * float("nan")})

    monkeypatch.setitem(dpo_recipe.DPO_LOSSES, "sigmoid", nan_loss)
    code = main(["dpo", f"train_file={pairs}", "model=tiny", "max_length=48", "progress=false", "tensorboard=false",
                 "max_steps=6", "micro_batch_size=2", f"output_dir={tmp_path / 'dpo'}", "max_nonfinite_steps=2"])
    assert code == 2 and "2 optimizer steps in a row" in capsys.readouterr().err
    assert not (tmp_path / "dpo" / "final").exists()


def test_grpo_skips_nan_steps_and_stops(tmp_path, monkeypatch, capsys):
    import json

    import posttrain.recipes.grpo as grpo_recipe
    from posttrain.cli import main
    from posttrain.rewards import REWARDS

    monkeypatch.setitem(REWARDS, "letters", lambda: lambda prompts, completions, **kw: [
        sum(c.isalpha() for c in text) / max(len(text), 1) for text in completions])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}"}) + "\n" for i in range(8)))
    preset = grpo_recipe.POLICY_LOSSES["grpo"]

    class NanPreset:
        defaults, advantage_estimator = preset.defaults, preset.advantage_estimator

        def __call__(self, *args, **kwargs):
            out = preset(*args, **kwargs)
            out.loss.data.fill_(float("nan"))  # NaN loss; its backward is the real one times nothing finite
            return out

    monkeypatch.setitem(grpo_recipe.POLICY_LOSSES, "grpo", NanPreset())
    code = main(["grpo", f"train_file={prompts}", "model=tiny", "rewards=[letters]", "max_new_tokens=4",
                 "num_generations=4", "prompts_per_step=2", "micro_batch_size=8", "max_steps=5", "progress=false",
                 "tensorboard=false", "max_nonfinite_steps=2", f"output_dir={tmp_path / 'grpo'}"])
    err = capsys.readouterr().err
    if code == 0:  # every group tied (zero-variance filter): no update ran, nothing to guard
        pytest.skip("no group survived the filter in this tiny run")
    assert code == 2 and "in a row" in err, err
    assert not (tmp_path / "grpo" / "final").exists()


def test_nonfinite_error_is_a_posttrain_error():
    assert issubclass(NonFiniteError, PosttrainError)  # the CLI prints it and exits 2


def test_diffusion_training_skips_nan_steps_and_stops(tmp_path, monkeypatch, capsys):
    from posttrain.cli import main
    from posttrain.diffusion import recipe

    original, calls = recipe.denoising_loss, {"n": 0}

    def nan_after_two(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] > 2:
            out = type(out)(**{k: v * float("nan") if torch.is_tensor(v) and v.is_floating_point() else v
                               for k, v in out.__dict__.items()})
        return out

    monkeypatch.setattr(recipe, "denoising_loss", nan_after_two)
    out = tmp_path / "diff"
    code = main(["diffusion", "train", "max_steps=20", "save_every=1", "keep_last=0", "log_every=1", "hidden_dim=16",
                 "num_layers=1", "batch_size=8", "num_data_samples=200", "warmup_steps=0", "num_eval_samples=10",
                 "num_inference_steps=5", "max_nonfinite_steps=3", f"output_dir={out}"])
    assert code == 2 and "3 optimizer steps in a row at step 5" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out)] == [f"step-0000000{i}" for i in (1, 2, 3, 4)]
    assert not (out / "model").exists()
    three, two = (load_state(list_checkpoints(out)[i]) for i in (2, 1))  # step 3 was skipped: state unchanged
    assert all(torch.equal(three["optimizer"]["state"][i][k], two["optimizer"]["state"][i][k])
               for i in two["optimizer"]["state"] for k in two["optimizer"]["state"][i])


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(rb, tmp_path):
    """2 processes (DDP, gloo): only rank 1's loss is NaN at step 2; both ranks must skip it, or their weights part."""
    data = rb.sft_data(tmp_path)
    assert rb.sft(data, tmp_path / "warm", "max_steps=1") == 0  # imports paid before the forks

    def nan_on_rank_1(rank: int) -> None:
        if rank == 1:  # (a forked child: its patch dies with it)
            from posttrain.recipes import sft as sft_recipe

            _nan_at(pytest.MonkeyPatch(), sft_recipe, "sft_loss", {2})

    args = ["sft", f"train_file={data}", *rb.sft_common, "max_steps=3", "save_steps=1", "keep_last=0",
            "grad_accum_steps=1"]
    pids = rb.start_runs([*args, f"output_dir={tmp_path / 'two'}"], tmp_path / "log", False, 2, nan_on_rank_1)
    assert rb.wait_runs(pids) == 0, (tmp_path / "log").read_text()[-3000:]
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert [r["train/nonfinite_skipped"] for r in rows] == [0.0, 1.0, 0.0]  # rank 0 logs rank 1's skip
    steps = list_checkpoints(tmp_path / "two")
    assert rb.same_weights(steps[0], steps[1])  # nothing applied at step 2
    assert not rb.same_weights(steps[1], steps[2])
