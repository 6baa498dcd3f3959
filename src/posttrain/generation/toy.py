"""Exactly enumerable language models, for checking samplers against closed-form sequence distributions.

`TableLM` is a causal LM whose next-token logits are a chosen function of the context (the prompt and the tokens
generated so far). It implements the forward interface the samplers use (input_ids, attention_mask, position_ids,
past_key_values=DynamicCache, use_cache, logits_to_keep -> .logits) and keeps its "KV cache" in a real
`DynamicCache` (the token ids stored as keys), so cropping, row selection and row repetition behave exactly as
they do for a transformer, at a cost of microseconds per call.

`completion_distribution` enumerates every completion of a prompt up to `max_new_tokens` (ended by a stop token or
by the length limit) with its exact probability under any such model, at temperature τ: the per-token softmax(z/τ)
multiplied along the sequence. With τ = 1 this is p(x); with τ = 1/α it is the low-temperature sampling
distribution, which differs from the power distribution p(x)^α / Z (`power_distribution`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
from torch import nn

LogitFn = Callable[[tuple[int, ...]], Sequence[float]]


class TableLM(nn.Module):
    """A causal LM with next-token logits `logit_fn(context)` over `vocab_size` tokens.

    context: the tuple of all real (unmasked) tokens up to and including the current position.
    """

    def __init__(self, logit_fn: LogitFn, vocab_size: int):
        super().__init__()
        self.logit_fn = logit_fn
        self.vocab_size = vocab_size
        self._device_anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the model a device
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}
        self.config = SimpleNamespace(eos_token_id=None, vocab_size=vocab_size)

    def _logits(self, context: tuple[int, ...]) -> torch.Tensor:
        if context not in self._memo:
            self._memo[context] = torch.as_tensor(self.logit_fn(context), dtype=torch.float32)
        return self._memo[context]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0, **kwargs):
        N, T = input_ids.shape
        ids = input_ids.to(torch.float32)[:, None, :, None]  # [N, 1, T, 1]: the "keys" are the token ids
        if past_key_values is not None:
            keys, _ = past_key_values.update(ids, ids, 0)
            all_ids = keys[:, 0, :, 0].long()  # [N, past + T]
        else:
            all_ids = input_ids
        total = all_ids.shape[1]
        keep = T if not logits_to_keep else min(logits_to_keep, T)
        rows = all_ids.tolist()
        masks = attention_mask.tolist() if attention_mask is not None else None
        out = []
        for n in range(N):
            for col in range(total - keep, total):  # the last `keep` positions of this call
                if masks is None:
                    context = tuple(rows[n][:col + 1])
                else:
                    context = tuple(t for t, m in zip(rows[n][:col + 1], masks[n][:col + 1]) if m)
                out.append(self._logits(context))
        logits = torch.stack(out).view(N, keep, self.vocab_size)
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def random_table_lm(vocab_size: int, *, scale: float = 1.5, seed: int = 0,
                    overrides: dict[tuple[int, ...], Sequence[float]] | None = None) -> TableLM:
    """A TableLM with pseudo-random logits (normal, std `scale`) fixed per context; `overrides` sets chosen contexts."""
    overrides = dict(overrides or {})

    def logit_fn(context: tuple[int, ...]) -> list[float]:
        if context in overrides:
            return list(overrides[context])
        gen = torch.Generator().manual_seed(hash((seed,) + context) % (2**61))
        return (torch.randn(vocab_size, generator=gen) * scale).tolist()

    return TableLM(logit_fn, vocab_size)


@torch.no_grad()
def completion_distribution(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                            stop_token_ids: Sequence[int], *, temperature: float = 1.0) -> dict[tuple[int, ...], float]:
    """Exact probability of every completion: token-by-token softmax(logits/τ) products, breadth first.

    A completion ends at its first stop token or after `max_new_tokens` tokens. Returns {completion: probability};
    the probabilities sum to 1. Costs one teacher-forced forward per live prefix, so keep V^T small.
    """
    stop = {int(t) for t in stop_token_ids}
    out: dict[tuple[int, ...], float] = {}
    frontier: dict[tuple[int, ...], float] = {(): 0.0}  # live prefix -> log-prob
    for step in range(max_new_tokens):
        prefixes = list(frontier)
        ids = torch.tensor([list(prompt_ids) + list(p) for p in prefixes])  # [n, c + step]
        logits = model(input_ids=ids, use_cache=False).logits[:, -1, :].double()  # [n, V]
        logps = torch.log_softmax(logits / temperature, dim=-1)
        nxt: dict[tuple[int, ...], float] = {}
        for prefix, row in zip(prefixes, logps):
            for v, lp in enumerate(row.tolist()):
                seq, total = prefix + (v,), frontier[prefix] + lp
                if v in stop or step == max_new_tokens - 1:
                    out[seq] = total
                else:
                    nxt[seq] = total
        frontier = nxt
    return {seq: float(torch.tensor(lp, dtype=torch.float64).exp()) for seq, lp in out.items()}


def power_distribution(dist: dict[tuple[int, ...], float], alpha: float) -> dict[tuple[int, ...], float]:
    """p(x)^α / Σ_y p(y)^α over the same completions."""
    weights = {x: p ** alpha for x, p in dist.items()}
    total = sum(weights.values())
    return {x: w / total for x, w in weights.items()}


def total_variation(p: dict, q: dict) -> float:
    """½ Σ_x |p(x) − q(x)| over the union of supports."""
    return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in set(p) | set(q))


def empirical(samples: Sequence[Sequence[int]]) -> dict[tuple[int, ...], float]:
    """Frequencies of the sampled sequences."""
    counts: dict[tuple[int, ...], float] = {}
    for s in samples:
        counts[tuple(s)] = counts.get(tuple(s), 0.0) + 1.0
    return {x: c / len(samples) for x, c in counts.items()}
