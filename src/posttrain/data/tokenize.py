"""Rows -> token ids and loss masks, through the model's chat template.

An encoded example is `{"input_ids": [...], "loss_mask": [...]}` where loss_mask[t] = 1 marks token t as a target
(its log-prob enters the loss). Only completion / assistant tokens are targets: "masking the loss on the question".
Conversations are rendered turn by turn with the tokenizer's own template; the prompt part of each assistant turn
(e.g. `<|im_start|>assistant\n`) is tokenized exactly as `add_generation_prompt=True` renders it at sampling time,
so training sees the same token boundaries that generation will.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

Example = dict[str, list[int]]


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], train_from: int = 0
) -> Example:
    """Token ids of a whole conversation; assistant turns at index >= `train_from` are targets."""
    input_ids: list[int] = []
    loss_mask: list[int] = []
    rendered = ""
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            with_header = _render(tokenizer, messages[:i], generation_prompt=True)
            if not with_header.startswith(rendered):
                raise ValueError("the chat template does not render conversations as growing prefixes")
            header_ids = _ids(tokenizer, with_header[len(rendered):])
            full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            body_ids = _ids(tokenizer, full[len(with_header):])
            input_ids += header_ids + body_ids
            loss_mask += [0] * len(header_ids) + [int(i >= train_from)] * len(body_ids)
        else:
            full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
            if not full.startswith(rendered):
                raise ValueError("the chat template does not render conversations as growing prefixes")
            piece = _ids(tokenizer, full[len(rendered):])
            input_ids += piece
            loss_mask += [0] * len(piece)
        rendered = full
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]], *, chat: bool = True) -> str:
    """The text a model continues from: the chat template with the generation prompt, or a plain string."""
    if isinstance(prompt, list):
        return _render(tokenizer, prompt, generation_prompt=True)
    if chat and getattr(tokenizer, "chat_template", None):
        return _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    return prompt


def encode_sft(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], fmt: str) -> Example:
    """One SFT example. Plain-text prompt/completion rows are concatenated as TRL does (no chat template) + EOS."""
    eos = [tokenizer.eos_token_id]
    if fmt == "messages":
        return encode_conversation(tokenizer, row["messages"])
    if fmt == "prompt_completion":
        if isinstance(row["completion"], list):
            prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
            return encode_conversation(tokenizer, prompt + row["completion"], train_from=len(prompt))
        p_ids, c_ids = _ids(tokenizer, row["prompt"]), _ids(tokenizer, row["completion"]) + eos
        return {"input_ids": p_ids + c_ids, "loss_mask": [0] * len(p_ids) + [1] * len(c_ids)}
    if fmt == "text":
        ids = _ids(tokenizer, row["text"]) + eos
        return {"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)}
    raise ValueError(f"SFT cannot encode format {fmt!r}")


def encode_preference(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> dict[str, list[int]]:
    """prompt_ids, chosen_ids, rejected_ids for one preference row (conversational or plain)."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list):
        prompt = row.get("prompt") or []
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not prompt:  # implicit prompt: the turns before the final assistant turn
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        p_text = _render(tokenizer, prompt, generation_prompt=True)
        out = {"prompt_ids": _ids(tokenizer, p_text)}
        for name, completion in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            full = _render(tokenizer, prompt + completion, generation_prompt=False)
            out[name] = _ids(tokenizer, full[len(p_text):])
        return out
    p_text = prompt_text(tokenizer, row.get("prompt") or "", chat=False)
    eos = [tokenizer.eos_token_id]
    return {"prompt_ids": _ids(tokenizer, p_text), "chosen_ids": _ids(tokenizer, chosen) + eos,
            "rejected_ids": _ids(tokenizer, rejected) + eos}


def encode_unpaired(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> dict[str, list[int]]:
    """prompt_ids, completion_ids for one unpaired-preference (KTO) row: the completion is tokenized exactly as a
    preference pair's chosen answer would be (same chat template, same EOS rule)."""
    ids = encode_preference(tokenizer, {"prompt": row.get("prompt"), "chosen": row["completion"],
                                        "rejected": row["completion"]})
    return {"prompt_ids": ids["prompt_ids"], "completion_ids": ids["chosen_ids"]}


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first `max_length` tokens (the prompt comes first, so the completion is what gets cut)."""
    return {k: v[:max_length] for k, v in example.items()}
