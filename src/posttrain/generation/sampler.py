"""The rollout engine: batched autoregressive sampling with a KV cache, behind a small `Generator` interface.

`Generator.generate(prompt_ids, params, n)` returns `Rollouts` for B prompts × G = n samples each (row i belongs to
prompt i // G). `HFGenerator` runs any transformers causal LM (plain or peft-wrapped) on torch; a vLLM backend with
the same interface lives in backends.py, so recipes never see which engine produced the samples.

How `HFGenerator` works:
1. Prefill: the B prompts are left-padded to a common length P and encoded ONCE, with an attention mask and
   position ids counted from each prompt's first real token, into a transformers `DynamicCache`.
2. Prefix sharing: the cache, mask and last logits are repeated G times along the batch (`batch_repeat_interleave`),
   so the G samples of a prompt share its prompt encoding.
3. Decode: each step draws one token per live row from the filtered distribution (logits.py), records its log-prob
   under that distribution (and optionally under the unfiltered temperature-1 model), and feeds only the live rows'
   new tokens through the model. Rows that finish (a stop token, a stop string, or max_new_tokens) leave the batch:
   their cache rows are dropped (`batch_select_indices`), so they cost no further compute.
Randomness: every step draws one uniform per row for all N = B·G rows, finished or not, from a torch.Generator
seeded by `params.seed`; row i's draws therefore do not depend on batch composition, and encoding the G copies of a
prompt separately gives the same samples as prefix sharing (tests/generation).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import DynamicCache

from posttrain.generation.logits import filtered_logps, sample_from_logps

FINISH_EOS = "eos"  # a stop token (EOS by default) was generated; it is the last completion token
FINISH_STOP = "stop_string"  # the decoded text contains a stop string; the text is cut before it
FINISH_LENGTH = "length"  # max_new_tokens reached (a truncated completion)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature = 0 means greedy decoding; top_k = 0 and top_p = 1 switch those filters off.

    stop: strings that end a completion (the returned text is cut before the first one; the token ids keep the
    token that completed it). stop_token_ids: tokens that end a completion (kept as its last token); None means
    the generator's EOS ids. seed: seeds the draws (None: one seed drawn from torch's global RNG, so
    `torch.manual_seed` makes a run reproducible). prompt_seeds: one seed per prompt instead (overrides `seed`):
    the G rows of prompt b draw from their own generator, so what a prompt samples does not depend on which prompts
    share its batch (RL recipes split a step's prompts across ranks). return_raw_logps: also return log-probs under
    the unfiltered temperature-1 model (the policy's own log-probs, for importance ratios when sampling at τ ≠ 1).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    prompt_seeds: tuple[int, ...] | None = None
    return_raw_logps: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.prompt_seeds is not None:
            object.__setattr__(self, "prompt_seeds", tuple(int(s) for s in self.prompt_seeds))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Rollouts:
    """N = B·G completions; row i is sample i % G of prompt i // G.

    completion_ids [N, T]: generated tokens, right-padded with `pad_token_id`; completion_mask [N, T]: 1 on generated
    tokens (including a final stop token). logps [N, T]: log-prob of each token under the distribution it was drawn
    from (after temperature/top-k/top-p, renormalized; for greedy decoding, under the temperature-1 model), 0 on
    padding. raw_logps [N, T]: under the unfiltered temperature-1 model, when asked for. texts [N]: decoded
    completions (None without a tokenizer). finish_reasons [N]: "eos", "stop_string" or "length".
    Cost: prefill_tokens (real prompt tokens, each prompt encoded once), decode_tokens (tokens fed in decode steps),
    padding_tokens (left-padding positions the prefill also computed); wall_s the time generate() took.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    raw_logps: torch.Tensor | None
    texts: list[str] | None
    finish_reasons: list[str]
    n: int
    prefill_tokens: int
    decode_tokens: int
    padding_tokens: int = 0
    wall_s: float = 0.0
    pad_token_id: int = 0

    @property
    def forward_tokens(self) -> int:
        """Tokens run through the model: prefill + decode (padding not counted; see padding_tokens)."""
        return self.prefill_tokens + self.decode_tokens

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(-1).tolist()  # [N]

    @property
    def generated_tokens(self) -> int:
        return int(self.completion_mask.sum())

    def token_lists(self) -> list[list[int]]:
        """[N] lists of generated token ids, no padding."""
        return [row[:n].tolist() for row, n in zip(self.completion_ids, self.lengths)]

    def logps_lists(self) -> list[list[float]]:
        return [row[:n].tolist() for row, n in zip(self.logps, self.lengths)]

    def grouped(self, values: Sequence) -> list[list]:
        """Split a flat [N] sequence into [B][G]."""
        return [list(values[b * self.n:(b + 1) * self.n]) for b in range(len(self.prompt_ids))]


@runtime_checkable
class Generator(Protocol):
    """The interface recipes and test-time strategies use; backends: HFGenerator (torch), VLLMGenerator (GPU)."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, n: int = 1) -> Rollouts: ...


def eos_ids_of(model: nn.Module | None, tokenizer=None) -> tuple[int, ...]:
    """EOS ids from the tokenizer, else the model's generation/model config (an int or a list)."""
    ids: list[int] = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(config, "eos_token_id", None) if config is not None else None
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if int(v) not in ids:
                ids.append(int(v))
        if ids:
            break
    return tuple(ids)


def draw_seed() -> int:
    """A seed from torch's global RNG (reproducible under torch.manual_seed)."""
    return int(torch.randint(0, 2**62, (1,)).item())


@dataclass
class _Rows:
    """Per-row outputs accumulated during decoding (python lists; N rows)."""

    tokens: list[list[int]]
    logps: list[list[float]]
    raw_logps: list[list[float]] | None
    finish: list[str | None] = field(default_factory=list)


class HFGenerator:
    """KV-cached batched sampling for a transformers causal LM (see the module docstring).

    eos_token_ids: default stop tokens (default: from the tokenizer / model config). pad_token_id: fills padding
    (default: the tokenizer's pad, else the first EOS, else 0). The model is put in eval mode while generating
    (dropout off) and restored afterwards.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad_token_id is None:
            pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()  # [rows, V]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, n: int = 1) -> Rollouts:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to decode the completions")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompt_ids, params, n)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, G: int) -> Rollouts:
        start = time.perf_counter()
        device = self.device
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        B, N = len(prompt_ids), len(prompt_ids) * G
        lengths = torch.tensor([len(p) for p in prompt_ids], device=device)  # [B]
        P = int(lengths.max())

        # 1. prefill the B prompts once, left-padded
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros((B, P), dtype=torch.long, device=device)
        for b, p in enumerate(prompt_ids):
            input_ids[b, P - len(p):] = torch.tensor(p, device=device)
            attention_mask[b, P - len(p):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        cache = DynamicCache()
        logits = self._forward(input_ids, attention_mask, position_ids, cache)  # [B, V]

        # 2. share each prompt's cache among its G samples
        if G > 1:
            cache.batch_repeat_interleave(G)
            logits = logits.repeat_interleave(G, dim=0)  # [N, V]
            attention_mask = attention_mask.repeat_interleave(G, dim=0)  # [N, P]
        next_pos = lengths.repeat_interleave(G)  # [N] position of the next token
        live = torch.arange(N, device=device)  # global ids of the rows still in the batch

        # 3. decode
        if params.prompt_seeds is not None:
            if len(params.prompt_seeds) != B:
                raise ValueError(f"prompt_seeds has {len(params.prompt_seeds)} seeds for {B} prompts")
            generators = [torch.Generator(device=device).manual_seed(s) for s in params.prompt_seeds]
        else:
            generators = [torch.Generator(device=device).manual_seed(
                params.seed if params.seed is not None else draw_seed())]
        per = G if params.prompt_seeds is not None else N  # rows drawn by each generator, in row order
        rows = _Rows(tokens=[[] for _ in range(N)], logps=[[] for _ in range(N)],
                     raw_logps=[[] for _ in range(N)] if params.return_raw_logps else None, finish=[None] * N)
        stop_window = 4 * max((len(s) for s in params.stop), default=0) + 4  # tokens; a char spans ≤ 4 byte tokens
        decode_tokens = 0
        for step in range(params.max_new_tokens):
            u = torch.cat([torch.rand(per, generator=g, dtype=torch.float64, device=device)
                           for g in generators])[live]  # [n_live]
            raw = torch.log_softmax(logits, dim=-1) if (params.greedy or params.return_raw_logps) else None
            if raw is not None and params.greedy:
                tok = logits.argmax(dim=-1)  # [n_live]
                tok_logps = raw.gather(-1, tok[:, None]).squeeze(-1)
            else:
                dist = filtered_logps(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
                tok = sample_from_logps(dist, u)
                tok_logps = dist.gather(-1, tok[:, None]).squeeze(-1)
            tok_list, lp_list = tok.tolist(), tok_logps.tolist()
            raw_list = raw.gather(-1, tok[:, None]).squeeze(-1).tolist() if raw is not None and params.return_raw_logps else None
            keep: list[int] = []
            for j, i in enumerate(live.tolist()):
                rows.tokens[i].append(tok_list[j])
                rows.logps[i].append(lp_list[j])
                if raw_list is not None and rows.raw_logps is not None:
                    rows.raw_logps[i].append(raw_list[j])
                if tok_list[j] in stop_ids:
                    rows.finish[i] = FINISH_EOS
                elif params.stop and self._hit_stop(rows.tokens[i][-stop_window:], params.stop):
                    rows.finish[i] = FINISH_STOP
                elif step == params.max_new_tokens - 1:
                    rows.finish[i] = FINISH_LENGTH
                else:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch and stop costing compute
                keep_t = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep_t)
                live, tok, attention_mask, next_pos = live[keep_t], tok[keep_t], attention_mask[keep_t], next_pos[keep_t]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=-1)
            logits = self._forward(tok[:, None], attention_mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
            decode_tokens += len(live)

        return self._collect(prompt_ids, rows, params, G, decode_tokens=decode_tokens,
                             prefill_tokens=int(lengths.sum()), padding_tokens=B * P - int(lengths.sum()),
                             wall_s=time.perf_counter() - start)

    def _hit_stop(self, tail: list[int], stop: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in stop)

    def _text(self, tokens: list[int], finish: str, stop: tuple[str, ...]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if finish == FINISH_STOP:
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                text = text[:min(cuts)]
        return text

    def _collect(self, prompt_ids, rows: _Rows, params: SamplingParams, G: int, **cost) -> Rollouts:
        N = len(rows.tokens)
        T = max(len(t) for t in rows.tokens)
        ids = torch.full((N, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((N, T), dtype=torch.long)
        logps = torch.zeros((N, T), dtype=torch.float32)
        raw = torch.zeros((N, T), dtype=torch.float32) if rows.raw_logps is not None else None
        for i, toks in enumerate(rows.tokens):
            ids[i, :len(toks)] = torch.tensor(toks)
            mask[i, :len(toks)] = 1
            logps[i, :len(toks)] = torch.tensor(rows.logps[i])
            if raw is not None and rows.raw_logps is not None:
                raw[i, :len(toks)] = torch.tensor(rows.raw_logps[i])
        finish = [f or FINISH_LENGTH for f in rows.finish]  # every row ends with a reason; the default is a guard
        texts = ([self._text(t, f, params.stop) for t, f in zip(rows.tokens, finish)]
                 if self.tokenizer is not None else None)
        return Rollouts(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids, completion_mask=mask,
                        logps=logps, raw_logps=raw, texts=texts, finish_reasons=finish, n=G,
                        pad_token_id=self.pad_token_id, **cost)


def encode_prompts(tokenizer, prompts: Sequence, *, chat: bool = True) -> list[list[int]]:
    """Token ids of prompts (strings or chat message lists), rendered with the chat template's generation prompt."""
    from posttrain.data.tokenize import prompt_text

    return [tokenizer(prompt_text(tokenizer, p, chat=chat), add_special_tokens=False)["input_ids"] for p in prompts]
