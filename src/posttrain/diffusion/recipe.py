"""Recipe: train a diffusion denoiser (Ho et al. 2020; Nakkiran et al. 2024) on 2-D data or 8×8 digits, and sample it.

`posttrain diffusion train --config configs/diffusion_moons.yaml [key=value ...] [--resume]` writes to output_dir:
  metrics.jsonl, tensorboard/        the loss every `logging_steps` steps, and the final sample-quality metrics
  checkpoints/step-N/                model.safetensors, ema.safetensors, config.json, trainer_state.pt (atomic)
  model/                             the final weights (raw and EMA) and config.json; what `sample` reads
  loss.png, samples.png, eval.json   the loss curve, a sample grid and its metrics (EMA weights)
`posttrain diffusion sample model_dir=RUN sampler=ddim num_inference_steps=50` writes samples.pt, samples.png and
metrics.json to RUN/samples/<sampler>-<steps>/ (or output_dir).

The loop: draw x_0 and t, noise x_0 to x_t, regress the network's output on the target, AdamW, EMA. Sampling runs
sampling.sample_loop with the scheduler the config names; the network never sees which one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from posttrain.config import field, to_dict
from posttrain.diffusion.data import DiffusionData, load_data
from posttrain.diffusion.ddim import DDIMScheduler
from posttrain.diffusion.ddpm import DDPMScheduler
from posttrain.diffusion.ema import EMA
from posttrain.diffusion.losses import denoising_loss
from posttrain.diffusion.metrics import digit_scores, train_digit_classifier, two_d_scores
from posttrain.diffusion.nets import MLPDenoiser
from posttrain.diffusion.plots import plot_loss, plot_samples
from posttrain.diffusion.sampling import initial_noise, sample_loop
from posttrain.diffusion.schedules import NoiseSchedule, add_noise, inference_timesteps, make_schedule, training_target
from posttrain.diffusion.ve import VEScheduler, ve_sigma, ve_training_example
from posttrain.errors import ConfigError
from posttrain.files import atomic_dir, atomic_write_text
from posttrain.train.checkpoint import (
    load_state,
    save_checkpoint,
    set_rng_state,
)
from posttrain.train.guards import NonFiniteGuard, check_finite_weights
from posttrain.train.logging import MetricsLogger, read_metrics
from posttrain.train.run_dir import close_runs, open_run
from posttrain.train.state import Progress

VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
VE_PREDICTIONS = ("sample", "prev_sample")


@dataclass
class DiffusionTrainConfig:
    output_dir: str = field("runs/diffusion_moons", help="folder for metrics, checkpoints, the final model and plots")
    dataset: Literal["moons", "swiss_roll", "digits"] = field("moons", help="moons | swiss_roll (2-D) | digits (8x8)")
    num_data_samples: int = field(10000, help="points drawn for a 2-D dataset (20% held out for metrics)")
    data_seed: int = field(0, help="seed of the data draw and the train/held-out split")
    process: Literal["vp", "ve"] = field(
        "vp", help="vp: variance-preserving DDPM/DDIM (Ho et al.); ve: x_t = x_0 + N(0, sigma^2 t) (Nakkiran et al.)")
    prediction_type: Literal["epsilon", "sample", "v_prediction", "prev_sample"] = field(
        "epsilon", help="network target; vp: epsilon | sample (x_0) | v_prediction; ve: sample (E[x_0|x_t]) | "
                        "prev_sample (x_{t-dt}, unit sampling steps only)")
    num_train_timesteps: int = field(1000, help="T: number of diffusion steps (ve: dt = 1/T)")
    beta_schedule: Literal["linear", "cosine"] = field("linear", help="vp beta schedule (Ho et al. / Nichol & Dhariwal)")
    beta_start: float = field(1e-4, help="vp linear schedule: first beta")
    beta_end: float = field(0.02, help="vp linear schedule: last beta")
    ve_sigma: float = field(2.0, help="ve: sigma, so x_1 ~ N(x_0, sigma^2); sampling starts from N(0, sigma^2), so it "
                                      "should exceed the data's spread (std 1 for 2-D sets, about 0.6 for digits)")
    ve_loss_weighting: Literal["edm", "none"] = field(
        "edm", help="ve with the x_0 target: weight each example by 1/c_out^2 so every noise level counts (Karras et "
                    "al. 2022), or none (Nakkiran et al.'s plain squared error, which barely trains the low-noise end). "
                    "The x_(t-dt) target is always unweighted: its target noise sigma^2 dt swamps the signal, and "
                    "reweighting amplifies it; train it with few steps (num_train_timesteps ~ 100)")
    hidden_dim: int = field(128, help="width of the residual MLP denoiser")
    num_layers: int = field(3, help="residual blocks in the denoiser")
    time_embed_dim: int = field(64, help="size of the sinusoidal time embedding")
    batch_size: int = field(256, help="examples per training step")
    lr: float = field(1e-3, help="AdamW peak learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_steps: int = field(100, help="linear learning-rate warmup steps")
    lr_schedule: Literal["constant", "cosine"] = field("cosine", help="after warmup: constant, or cosine to 10% of lr",
                                                      aliases=("lr_decay",))
    max_steps: int = field(3000, help="optimizer steps in total")
    max_grad_norm: float = field(1.0, help="clip the gradient's global norm to this (0 = off)", aliases=("grad_clip",))
    ema_decay: float = field(0.999, help="EMA decay of the weights used for sampling (0 = sample with raw weights)")
    logging_steps: int = field(50, help="log averaged metrics every N steps", aliases=("log_every",))
    save_steps: int = field(1000, help="write an atomic checkpoint every N steps (and at the end)",
                            aliases=("save_every",))
    keep_last: int = field(2, help="checkpoints kept on disk (the newest ones); 0 = keep all")
    max_nonfinite_steps: int = field(5, help="stop with an error after this many steps in a row whose loss or "
                                             "gradient norm is NaN/inf (each such step is skipped, not applied)")
    overwrite: bool = field(False, help="start over in an output_dir that holds another run, deleting it")
    seed: int = field(0, help="seed of initialization, batches, timesteps and noise")
    num_threads: int = field(0, help="torch CPU threads (0 = leave torch's default)")
    progress: bool = field(True, help="show a progress bar")
    sampler: Literal["ddpm", "ddim"] = field("ddim", help="sampler for the end-of-training sample grid and metrics")
    num_inference_steps: int = field(100, help="sampling steps for the end-of-training samples")
    eta: float = field(0.0, help="DDIM eta for the end-of-training samples")
    num_eval_samples: int = field(1000, help="samples drawn at the end of training for the grid and the metrics")

    def validate(self) -> None:
        allowed = VP_PREDICTIONS if self.process == "vp" else VE_PREDICTIONS
        if self.prediction_type not in allowed:
            raise ConfigError(f"key 'prediction_type': '{self.prediction_type}' is not available for process "
                              f"'{self.process}'; choose one of {list(allowed)}.")
        for key in ("num_train_timesteps", "hidden_dim", "num_layers", "batch_size", "max_steps", "logging_steps",
                    "save_steps", "num_inference_steps", "num_eval_samples", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key '{key}' must be >= 1, got {getattr(self, key)}.")
        if self.keep_last < 0:
            raise ConfigError(f"key 'keep_last' must be >= 0, got {self.keep_last}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"key 'ema_decay' must be in [0, 1), got {self.ema_decay}.")
        _check_sampling(self.process, self.prediction_type, self.sampler, self.num_inference_steps,
                        self.num_train_timesteps, self.eta)


@dataclass
class DiffusionSampleConfig:
    model_dir: str = field(help="a training output_dir (its model/ folder is used) or one of its checkpoint folders")
    output_dir: str = field("", help="where to write samples (default: <model_dir>/samples/<sampler>-<steps>)")
    sampler: Literal["ddpm", "ddim"] = field("ddim", help="ddpm (stochastic) or ddim (eta = 0: deterministic)")
    num_inference_steps: int = field(50, help="number of sampling steps S (a sub-sequence of the T training steps)")
    eta: float = field(0.0, help="DDIM eta: 0 deterministic, 1 = DDPM's fixed-small variance")
    variance_type: Literal["fixed_small", "fixed_large"] = field(
        "fixed_small", help="DDPM variance: posterior (small) or beta (large); for ve: exact posterior or sigma^2 dt")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = field("leading", help="how the S steps are spaced")
    clip_sample: float = field(0.0, help="clamp the predicted x_0 to [-c, c] at every step (0 = off)")
    num_samples: int = field(1000, help="number of samples")
    batch_size: int = field(1000, help="samples generated per batch")
    seed: int = field(0, help="seed of the initial noise and of every step's noise")
    use_ema: bool = field(True, help="sample with the EMA weights (false: the raw weights)")
    evaluate: bool = field(True, help="score the samples against held-out data (metrics.json)")
    num_threads: int = field(0, help="torch CPU threads (0 = leave torch's default)")

    def validate(self) -> None:
        if self.num_samples < 1 or self.batch_size < 1 or self.num_inference_steps < 1:
            raise ConfigError("keys 'num_samples', 'batch_size' and 'num_inference_steps' must be >= 1.")


def _check_sampling(process: str, prediction_type: str, sampler: str, steps: int, T: int, eta: float) -> None:
    if steps > T:
        raise ConfigError(f"key 'num_inference_steps': {steps} is more than num_train_timesteps = {T}.")
    if process == "ve" and sampler == "ddim" and eta != 0:
        raise ConfigError("key 'eta': the ve DDIM step (Nakkiran et al. Algorithm 2) is deterministic; use eta=0.")
    if process == "ve" and prediction_type == "prev_sample" and steps != T:
        raise ConfigError(f"key 'num_inference_steps': a ve model trained on x_(t-dt) takes unit steps only, so it "
                          f"must equal num_train_timesteps = {T} (got {steps}); train with prediction_type=sample "
                          f"to sample with fewer steps.")


# --- components built from plain arguments ----------------------------------------------------------------------------


def build_model(data_dim: int, hidden_dim: int, num_layers: int, time_embed_dim: int, num_train_timesteps: int):
    """The residual-MLP denoiser for `data_dim`-dimensional data."""
    return MLPDenoiser(data_dim, hidden_dim=hidden_dim, num_layers=num_layers, time_embed_dim=time_embed_dim,
                       num_train_timesteps=num_train_timesteps)


def build_schedule(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
    """The VP noise schedule (linear or cosine β) of `num_train_timesteps` steps."""
    kwargs = {"beta_start": beta_start, "beta_end": beta_end} if beta_schedule == "linear" else {}
    return make_schedule(beta_schedule, num_train_timesteps, **kwargs)


def make_denoise_fn(model: torch.nn.Module, process: str, num_train_timesteps: int, ve_sigma_value: float,
                    prediction_type: str = "sample"):
    """The function f(x_t, t) whose output the scheduler reads. For vp it is the network itself.

    For ve the network F is wrapped in Karras et al. 2022's preconditioning (EDM, Table 1, σ_data = 1):
    x̂_0 = c_skip x_t + c_out F(c_in x_t, t), c_in = 1/√(1+σ_t²), c_skip = 1/(1+σ_t²), c_out = σ_t/√(1+σ_t²),
    since ve inputs grow to σ ≈ 4 and F then only has to learn a unit-scale correction. For prediction_type
    "prev_sample", f maps x̂_0 through Claim 2, f = x_t + (Δt/t)(x̂_0 − x_t), and is trained on x_{t−Δt} as in
    Pseudocode 1 (the two targets then differ only in the noise of the regression target)."""
    if process == "vp":
        return model

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x_t.dim() - 1)))
        sigma_t = ve_sigma(t, num_train_timesteps, ve_sigma_value).to(x_t.dtype).reshape(shape)  # [B, 1]
        norm = 1 + sigma_t**2
        x0_hat = x_t / norm + sigma_t * norm.rsqrt() * model(x_t * norm.rsqrt(), t)
        if prediction_type == "sample":
            return x0_hat
        dt_over_t = 1.0 / (t.to(x_t.dtype) + 1).reshape(shape)  # Δt/t with t = (k+1)/T
        return x_t + dt_over_t * (x0_hat - x_t)

    return denoise


def ve_loss_weight(t: torch.Tensor, num_train_timesteps: int, ve_sigma_value: float) -> torch.Tensor:
    """λ = 1/c_out² = (1+σ_t²)/σ_t² (Karras et al. 2022, §5 and Table 1) for the x_0 target, so that the network F's
    own regression target has unit scale at every σ. t: [B] -> [B].

    Unweighted, the x_0 error at noise σ_t can be at most ~σ_t, so the loss (and the gradient) from the low-noise end,
    which fixes the samples' fine structure, vanishes; with σ_t = σ√t and t ~ U[0, 1] only 4% of draws have
    σ_t < 0.4 for σ = 2. On two moons this weighting took sliced W2 from 0.13 to 0.08 (σ = 4, 4000 steps)."""
    sigma_t = ve_sigma(t, num_train_timesteps, ve_sigma_value)  # [B] float64
    return ((1 + sigma_t**2) / sigma_t**2).float()


def make_scheduler(train: dict, sampler: str, *, eta: float = 0.0, variance_type: str = "fixed_small",
                   clip_sample: float = 0.0):
    """The sampler for a model trained with the settings in `train` (a DiffusionTrainConfig as a dict)."""
    clip = clip_sample if clip_sample > 0 else None
    if train["process"] == "ve":
        variance = {"fixed_large": "large", "fixed_small": "small"}[variance_type]
        return VEScheduler(train["ve_sigma"], train["num_train_timesteps"], target=train["prediction_type"],
                           sampler=sampler, variance=variance)
    schedule = build_schedule(train["beta_schedule"], train["num_train_timesteps"], train["beta_start"],
                              train["beta_end"])
    if sampler == "ddpm":
        return DDPMScheduler(schedule, train["prediction_type"], variance_type, clip)
    return DDIMScheduler(schedule, train["prediction_type"], eta, clip)


def generate(denoise_fn, scheduler, timesteps: list[int], num_samples: int, data_dim: int, *,
             generator: torch.Generator, batch_size: int = 1000) -> torch.Tensor:
    """num_samples draws [N, data_dim], in batches; every random number comes from `generator`."""
    chunks = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        x_init = initial_noise((n, data_dim), scheduler, generator)
        chunks.append(sample_loop(denoise_fn, scheduler, timesteps, x_init, generator=generator))
    return torch.cat(chunks)  # [N, data_dim]


def evaluate_samples(samples: torch.Tensor, data: DiffusionData, classifier=None) -> dict[str, float]:
    """2-D: sliced W2 and MMD² against held-out points. Digits: classifier confidence, class entropy and the
    Fréchet distance of classifier features against held-out digits, after clipping samples to the valid pixel range
    [−1, 1] (as writing them out as images would; FID is computed on such images)."""
    if not data.is_image:
        return two_d_scores(samples, data.test)
    if classifier is None:
        classifier = train_digit_classifier(data.train, data.train_labels)
    return dataclasses.asdict(digit_scores(classifier, samples.clamp(-1, 1), data.test))


# --- train ------------------------------------------------------------------------------------------------------------


def _save_model(folder: Path, model: torch.nn.Module, ema: EMA | None, config: DiffusionTrainConfig) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(folder / "ema.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")


def _lr_factor(step: int, warmup: int, total: int, decay: str) -> float:
    """Linear warmup to 1 over `warmup` steps, then constant or cosine down to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: DiffusionTrainConfig, resume: str | None = None) -> dict[str, float]:
    """Train, checkpoint, and write the final model, loss plot, sample grid and eval.json. Returns the eval metrics."""
    try:
        return _train(config, resume)
    finally:
        close_runs()  # the output folder's lock and the Ctrl-C handler (train.run_dir)


def _train(config: DiffusionTrainConfig, resume: str | None) -> dict[str, float]:
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    out = Path(config.output_dir)
    run_dir = open_run(out, resume=resume, overwrite=config.overwrite)  # lock, clean, resume point
    checkpoint = run_dir.checkpoint

    data = load_data(config.dataset, num_samples=config.num_data_samples, seed=config.data_seed)
    torch.manual_seed(config.seed)
    model = build_model(data.data_dim, config.hidden_dim, config.num_layers, config.time_embed_dim,
                        config.num_train_timesteps)
    denoise_fn = make_denoise_fn(model, config.process, config.num_train_timesteps, config.ve_sigma,
                                 config.prediction_type)
    schedule = build_schedule(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, config.max_steps, config.lr_schedule))
    ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(config.seed)  # every batch index, t and noise draw comes from here

    start_step = 0
    if checkpoint is not None:
        state = load_state(checkpoint)
        model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        generator.set_state(state["generator"])
        if ema is not None:
            ema.load_state_dict({**state["ema"], "shadow": load_file(str(checkpoint / "ema.safetensors"))})
        set_rng_state(state["rng"])
        start_step = state["step"]
        print(f"resumed from {checkpoint} at step {start_step}")

    logger = MetricsLogger(out, start_step=start_step)
    T, B = config.num_train_timesteps, config.batch_size
    # sums since the last log line; saved in checkpoints, so a resumed run logs the same averages
    window = {"loss": 0.0, "loss_t_low": 0.0, "loss_t_high": 0.0, "n_low": 0, "n_high": 0, "steps": 0}
    if checkpoint is not None:
        window = state["log_window"]
    tic, steps_since_tic = time.perf_counter(), 0
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    progress = Progress(config.max_steps, initial=start_step, enabled=config.progress, desc="diffusion")
    for step in range(start_step + 1, config.max_steps + 1):
        # 1. a batch of x_0, timesteps t ~ U{0..T−1} and noise
        x0 = data.train[torch.randint(0, data.train.shape[0], (B,), generator=generator)]  # [B, data_dim]
        t = torch.randint(0, T, (B,), generator=generator)  # [B]
        noise = torch.randn(x0.shape, generator=generator)  # [B, data_dim]
        # 2. the noised input and the regression target
        if config.process == "vp":
            x_t = add_noise(x0, noise, t, schedule.alphas_cumprod)
            target = training_target(x0, noise, t, schedule.alphas_cumprod, config.prediction_type)
        else:
            step_noise = torch.randn(x0.shape, generator=generator)  # [B, data_dim]
            x_t, target = ve_training_example(x0, t, T, config.ve_sigma, noise, step_noise, config.prediction_type)
            x_t, target = x_t.float(), target.float()
        # 3. regress, step, average
        weights = None
        if config.process == "ve" and config.prediction_type == "sample" and config.ve_loss_weighting == "edm":
            weights = ve_loss_weight(t, T, config.ve_sigma)  # [B]
        out_loss = denoising_loss(denoise_fn(x_t, t), target, weights)
        optimizer.zero_grad(set_to_none=True)
        out_loss.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
        if guard.ok(out_loss.loss, grad_norm, step=step):  # a NaN/inf step is skipped, not applied
            optimizer.step()
            lr_scheduler.step()
            if ema is not None:
                ema.update(model)

        low = t < T // 2
        window["loss"] += float(out_loss.loss.detach())
        window["loss_t_low"] += float(out_loss.per_example_loss[low].sum())
        window["loss_t_high"] += float(out_loss.per_example_loss[~low].sum())
        window["n_low"] += int(low.sum())
        window["n_high"] += int((~low).sum())
        window["steps"] += 1
        steps_since_tic += 1
        progress.update()
        if step % config.logging_steps == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - tic
            logger.log(step, {
                "train/loss": window["loss"] / window["steps"],  # the same key as every other command
                "train/loss_t_low": window["loss_t_low"] / max(1, window["n_low"]),
                "train/loss_t_high": window["loss_t_high"] / max(1, window["n_high"]),
                "train/grad_norm": float(grad_norm), "train/lr": lr_scheduler.get_last_lr()[0],
                "steps_per_s": steps_since_tic / elapsed, "nonfinite_total": float(guard.skipped),
            })
            window = dict.fromkeys(window, 0)
            tic, steps_since_tic = time.perf_counter(), 0
        stop = run_dir.stop_requested()  # Ctrl-C: checkpoint this step, then exit 130
        if stop or step % config.save_steps == 0 or step == config.max_steps:
            check_finite_weights([model], f"the checkpoint of step {step}")
            save_checkpoint(
                out, step, keep_last=config.keep_last,
                save_model=lambda folder: _save_model(folder, model, ema, config),
                state={"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                       "generator": generator.get_state(), "log_window": dict(window),
                       "ema": None if ema is None else {k: v for k, v in ema.state_dict().items() if k != "shadow"}},
            )
        if stop:
            raise KeyboardInterrupt(f"stopped after step {step}; resume with --resume")

    check_finite_weights([model], str(out / "model"))
    with atomic_dir(out / "model") as folder:
        _save_model(folder, model, ema, config)
    progress.close()
    plot_loss(read_metrics(out / "metrics.jsonl"), out / "loss.png")

    # 4. samples from the EMA weights, a grid and their metrics
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    scheduler = make_scheduler(to_dict(config), config.sampler, eta=config.eta)
    timesteps = inference_timesteps(T, config.num_inference_steps)
    samples = generate(denoise_fn, scheduler, timesteps, config.num_eval_samples, data.data_dim,
                       generator=torch.Generator().manual_seed(config.seed + 1))
    plot_samples(samples, out / "samples.png", reference=data.test, is_image=data.is_image,
                 title=f"{config.dataset}: {config.sampler}, {config.num_inference_steps} steps")
    metrics = evaluate_samples(samples, data)
    atomic_write_text(out / "eval.json", json.dumps(
        {"sampler": config.sampler, "num_inference_steps": config.num_inference_steps, "eta": config.eta,
         "num_samples": config.num_eval_samples, **metrics}, indent=2) + "\n")
    logger.log(config.max_steps, {f"eval/{k}": v for k, v in metrics.items()})
    logger.close()
    print(f"trained {config.max_steps} steps; {config.sampler}-{config.num_inference_steps} samples: "
          + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f"; the model is in {out / 'model'} (what "
          f"`posttrain diffusion sample model_dir={out}` reads), metrics in {out / 'metrics.jsonl'}")
    return metrics


# --- sample -----------------------------------------------------------------------------------------------------------


def _model_folder(model_dir: Path) -> Path:
    if (model_dir / "model" / "config.json").is_file():
        return model_dir / "model"
    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        return model_dir
    raise ConfigError(f"key 'model_dir': '{model_dir}' holds neither model/config.json nor config.json + "
                      f"model.safetensors; pass a training output_dir or one of its checkpoints/step-N folders.")


def load_trained(model_dir: str | Path, use_ema: bool = True) -> tuple[torch.nn.Module, dict]:
    """The denoiser (EMA weights if present and asked for) and its training settings (a dict)."""
    folder = _model_folder(Path(model_dir))
    train_cfg = json.loads((folder / "config.json").read_text())
    data_dim = 64 if train_cfg["dataset"] == "digits" else 2
    model = build_model(data_dim, train_cfg["hidden_dim"], train_cfg["num_layers"], train_cfg["time_embed_dim"],
                        train_cfg["num_train_timesteps"])
    weights = folder / ("ema.safetensors" if use_ema and (folder / "ema.safetensors").is_file() else "model.safetensors")
    model.load_state_dict(load_file(str(weights)))
    return model.eval(), train_cfg


def sample(config: DiffusionSampleConfig, resume: str | None = None) -> dict[str, float]:
    """Draw samples from a trained model; write samples.pt, samples.png and (if evaluate) metrics.json."""
    if resume is not None:
        raise ConfigError("--resume applies to `posttrain diffusion train`, not to sampling.")
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    model, train_cfg = load_trained(config.model_dir, config.use_ema)
    T = train_cfg["num_train_timesteps"]
    _check_sampling(train_cfg["process"], train_cfg["prediction_type"], config.sampler, config.num_inference_steps,
                    T, config.eta)
    out = Path(config.output_dir or Path(config.model_dir) / "samples" / f"{config.sampler}-{config.num_inference_steps}")
    scheduler = make_scheduler(train_cfg, config.sampler, eta=config.eta, variance_type=config.variance_type,
                               clip_sample=config.clip_sample)
    timesteps = inference_timesteps(T, config.num_inference_steps, config.timestep_spacing)
    denoise_fn = make_denoise_fn(model, train_cfg["process"], T, train_cfg["ve_sigma"], train_cfg["prediction_type"])
    data_dim = 64 if train_cfg["dataset"] == "digits" else 2
    tic = time.perf_counter()
    samples = generate(denoise_fn, scheduler, timesteps, config.num_samples, data_dim,
                       generator=torch.Generator().manual_seed(config.seed), batch_size=config.batch_size)
    seconds = time.perf_counter() - tic
    out.mkdir(parents=True, exist_ok=True)
    torch.save(samples, out / "samples.pt")
    data = load_data(train_cfg["dataset"], num_samples=train_cfg["num_data_samples"], seed=train_cfg["data_seed"])
    plot_samples(samples, out / "samples.png", reference=data.test, is_image=data.is_image,
                 title=f"{train_cfg['dataset']}: {config.sampler}, {config.num_inference_steps} steps")
    metrics = {"samples_per_s": config.num_samples / seconds}
    if config.evaluate:
        metrics.update(evaluate_samples(samples, data))
    atomic_write_text(out / "metrics.json", json.dumps({**to_dict(config), **metrics}, indent=2) + "\n")
    print(f"{config.num_samples} samples in {seconds:.1f}s -> {out}; "
          + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics
