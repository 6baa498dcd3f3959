"""Generation backends behind the `Generator` interface, chosen by one key, `generation_backend`:

    hf      the torch engine (sampler.HFGenerator): KV-cached sampling on the trainer's own model; exact, the default
    vllm    vLLM (generation/vllm_engine.py), in one of two modes (`vllm_mode`):
              colocate  the engine lives in the training process; weights are copied in after every update
              server    the engine runs in another process (`posttrain serve`, generation/server.py), reached over
                        HTTP at `vllm_url`; with no URL the recipe starts one locally and stops it at the end

Recipes (grpo, ppo), `posttrain eval` and its test-time strategies (best-of-N, majority vote) take the keys of
`GenerationOptions`, call `rollout_engine(...)` once, `generate(...)` for every batch, and `sync_weights(...)`
after each optimizer step; the torch engine needs no sync (it samples from the trainer's model itself).
vLLM is imported only when asked for; a machine without it gets one error naming the install command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

from posttrain.config import field
from posttrain.errors import ConfigError
from posttrain.generation.sampler import HFGenerator

BACKENDS = ("hf", "vllm")
VLLM_MODES = ("colocate", "server")


@dataclasses.dataclass(kw_only=True)
class GenerationOptions:
    """Config keys choosing the generation engine (shared by grpo, ppo and eval)."""

    generation_backend: Literal["hf", "vllm"] = field("hf", help="hf (the torch sampler, exact, default) or vllm")
    vllm_mode: Literal["colocate", "server"] = field("colocate", help="vllm: colocate (engine in this process) or "
                                                     "server (`posttrain serve` in another process)")
    vllm_url: str = field("", help="vllm server mode: http://host:port of a running `posttrain serve`; empty: "
                                   "start one locally for the run")
    vllm_timeout_s: float = field(120.0, help="vllm server mode: longest wait for the server to answer")
    vllm_kv_cache_gib: float = field(1.0, help="vllm on a CPU: KV-cache size in GiB")
    vllm_gpu_memory_utilization: float = field(0.4, help="vllm on a GPU: fraction of its memory vLLM may take")
    vllm_max_model_len: int = field(0, help="vllm: prompt + completion tokens reserved per sequence (0: the model's)")
    vllm_sleep: bool = field(True, help="vllm colocate on a GPU: free the KV cache during updates (no-op on CPU)")

    def validate_generation(self) -> None:
        """Check the generation keys (called from the recipe's validate)."""
        if self.generation_backend not in BACKENDS:
            raise ConfigError(f"key 'generation_backend' must be one of {list(BACKENDS)}, got "
                              f"{self.generation_backend!r}.")
        if self.vllm_mode not in VLLM_MODES:
            raise ConfigError(f"key 'vllm_mode' must be one of {list(VLLM_MODES)}, got {self.vllm_mode!r}.")
        if self.vllm_url and not self.vllm_url.startswith(("http://", "https://")):
            raise ConfigError(f"key 'vllm_url' must start with http:// or https://, got {self.vllm_url!r}.")
        if self.vllm_timeout_s <= 0:
            raise ConfigError(f"key 'vllm_timeout_s' must be > 0, got {self.vllm_timeout_s}.")
        if self.vllm_kv_cache_gib <= 0:
            raise ConfigError(f"key 'vllm_kv_cache_gib' must be > 0, got {self.vllm_kv_cache_gib}.")
        if self.vllm_max_model_len < 0:
            raise ConfigError(f"key 'vllm_max_model_len' must be >= 0, got {self.vllm_max_model_len}.")


def save_policy(model, tokenizer, folder: str) -> str:
    """Write the policy (LoRA merged) and tokenizer as a Hugging Face folder an engine can load."""
    from safetensors.torch import save_file

    from posttrain.generation.vllm_engine import policy_weights

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    os.makedirs(folder, exist_ok=True)
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    weights, seen = {}, set()
    for name, tensor in policy_weights(model):
        ptr = tensor.data_ptr()
        weights[name] = tensor.detach().to("cpu").contiguous().clone() if ptr in seen else tensor.detach().to("cpu").contiguous()
        seen.add(ptr)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


class _OwnedFolder:
    """A temporary folder holding the policy the engine loaded; removed when the engine is closed."""

    def __init__(self, model, tokenizer):
        self.path = tempfile.mkdtemp(prefix="posttrain-vllm-")
        save_policy(model, tokenizer, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def rollout_engine(options: GenerationOptions, model, tokenizer, *, seed: int = 0, dtype: str = "float32"):
    """The generator a recipe samples with: HFGenerator on `model`, or a vLLM engine holding `model`'s weights.

    vLLM loads the current policy from a temporary folder (so random, resumed and LoRA models all work); in server
    mode the server's weights are then replaced by the trainer's, whatever model it was started with.
    """
    options.validate_generation()
    if options.generation_backend == "hf":
        return HFGenerator(model, tokenizer)
    max_len = options.vllm_max_model_len or None
    if options.vllm_mode == "colocate":
        from posttrain.generation.vllm_engine import VLLMEngine, import_vllm

        import_vllm()  # the install message before anything is written
        folder = _OwnedFolder(model, tokenizer)
        try:
            engine = VLLMEngine(folder.path, tokenizer=tokenizer, eos_token_ids=HFGenerator(model, tokenizer).eos_token_ids,
                                dtype=dtype, max_model_len=max_len, kv_cache_gib=options.vllm_kv_cache_gib,
                                gpu_memory_utilization=options.vllm_gpu_memory_utilization, seed=seed,
                                sleep_between_steps=options.vllm_sleep)
        finally:
            folder.remove()  # the engine holds the weights and tokenizer now
        return _opened(engine)
    from posttrain.generation.server import VLLMServerClient, start_local_server

    eos = HFGenerator(model, tokenizer).eos_token_ids
    if options.vllm_url:
        client = VLLMServerClient(options.vllm_url, tokenizer=tokenizer, eos_token_ids=eos,
                                  timeout_s=options.vllm_timeout_s)
    else:
        folder = _OwnedFolder(model, tokenizer)
        try:
            client = start_local_server(folder.path, tokenizer=tokenizer, eos_token_ids=eos, dtype=dtype,
                                        max_model_len=max_len, kv_cache_gib=options.vllm_kv_cache_gib, seed=seed,
                                        timeout_s=options.vllm_timeout_s)
        finally:
            folder.remove()  # the server has loaded it (or failed to)
    _opened(client)  # (a server this run started is stopped by close_engines if the first sync fails)
    client.sync(model)  # the server now holds exactly the trainer's weights
    return client


def sync_weights(generator, model, timer) -> dict[str, float]:
    """After an optimizer step: push the weights into a vLLM engine, timed under `timer("weight_sync")` (so the
    step logs `time/weight_sync`); returns {"vllm/weights_version": k}. The torch engine samples from `model`
    itself and needs nothing: {}. timer: a train.rl.StageTimer (any callable returning a context manager)."""
    sync = getattr(generator, "sync", None)
    if sync is None:
        return {}
    with timer("weight_sync"):
        sync(model)
    return {"vllm/weights_version": float(generator.version)}


def sleep_engine(generator) -> None:
    """Before the update: let a colocated vLLM engine free its KV cache where the device supports it."""
    sleep = getattr(generator, "sleep", None)
    if sleep is not None:
        sleep()


def close_generator(generator) -> None:
    """Release an engine (stop a server this run started); a no-op for HFGenerator."""
    if any(e is generator for e in _open_engines):
        _open_engines.remove(generator)
    close = getattr(generator, "close", None)
    if close is not None:
        close()


_open_engines: list[Any] = []  # engines rollout_engine made that hold resources (vLLM: KV cache, a server process)


def _opened(engine):
    """Record an engine that needs closing (see closing_engines); returns it."""
    if getattr(engine, "close", None) is not None:
        _open_engines.append(engine)
    return engine


@contextlib.contextmanager
def closing_engines() -> Iterator[None]:
    """Close every engine `rollout_engine` opens inside the block, whether the block returns or raises: a run that
    fails mid-way does not leave a vLLM engine's KV cache held, or a server it started running, in this process."""
    mark = len(_open_engines)
    try:
        yield
    finally:
        while len(_open_engines) > mark:
            close_generator(_open_engines[-1])


def make_generator(backend: str, model=None, tokenizer=None, *, model_path: str | None = None, **kwargs: Any):
    """'hf': HFGenerator(model, tokenizer); 'vllm': VLLMEngine(model_path) (a saved Hugging Face folder)."""
    if backend == "hf":
        if model is None:
            raise ConfigError("backend 'hf' needs a loaded model")
        return HFGenerator(model, tokenizer, **kwargs)
    if backend == "vllm":
        if model_path is None:
            raise ConfigError("backend 'vllm' needs model_path, a local checkpoint folder (save_pretrained output)")
        from posttrain.generation.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, tokenizer=tokenizer, **kwargs)
    raise ConfigError(f"unknown generation backend {backend!r}; expected one of {list(BACKENDS)}")
