"""Power sampling: draws from π ∝ p^α by block-wise Metropolis–Hastings (Karan & Du 2025, arXiv 2510.14901, Alg. 1).

Notation (paper -> code):
    p                  -> the base model; `target_logps` are its temperature-1 log-probs log p(x_t | x_<t)
    α                  -> `alpha`; the target is π(x) ∝ p(x)^α over whole completions
    p_prop             -> base model at temperature 1/α, NO top-k/top-p: log_softmax(α·z); `proposal_logps`
    B, T, N_MCMC       -> `block_size`, `max_new_tokens`, `mcmc_steps`
    π_k                -> intermediate target p(x_{0:(k+1)B})^α over completions of at most (k+1)·B tokens
    m                  -> `m`, the first resampled position (0-based in the completion)

Algorithm 1, for k = 0 .. ⌈T/B⌉−1 with L_k = min((k+1)·B, T):
  1. extend the current completion x to L_k tokens (or a stop token) with draws from p_prop;
  2. N_MCMC times: draw m ~ U{0..L_k−1} (`position="block"`, as Alg. 1); if m < |x|, propose x' = x[:m] + a
     p_prop continuation up to L_k tokens or a stop token, and accept with Eq. 9 (ttc/mh.py):
       log A = α·(Σ log p(x'[m:]) − Σ log p(x[m:])) + Σ log p_prop(x[m:]) − Σ log p_prop(x'[m:]);
     if m ≥ |x| (x already ended) the step keeps x. `position="sequence"` draws m ~ U{0..|x|−1} instead and adds
     the position term log(|x| / |x'|) (mh.py explains why it is needed);
  3. a chain whose x already ends with a stop token skips step 1 but still takes its N_MCMC steps on π_k in every
     later block (`ended="continue"`, the default): a proposal from m < |x| may replace the ended x by a longer one.
Every block's kernel leaves π_k invariant, and π_{K−1} = p^α/Z, so the law after the last block converges to p^α/Z
as N_MCMC grows, for ANY block size. `ended="stop"` is what the paper's code does (a chain stops after the block in
which it ends): then a sequence that ended in block k is never compared with longer ones, and the law stays a
mixture of the intermediate targets (≈ 0.1 TV from p^α/Z on the toy of tests/ttc however large N_MCMC is).
tests/ttc check the draws against the exact composed kernels and against p^α/Z on a model whose completions can be
enumerated, for several block sizes.

Pitfalls of the authors' released code avoided: the acceptance uses the FULL current suffix x[m:] even
when the proposal ends early at EOS; the proposal is exactly softmax(α·z) (no default top-k=50 truncation);
every random draw of a chain comes from its own seeded torch.Generator.

KV-cache reuse (`reuse_cache=True`, `_MaskedCache`): a chain keeps the cache of its current sequence (prompt + x,
all but the last token). A proposal from m hides the cache columns of positions ≥ m−1 and feeds the token at m−1
before sampling, so nothing before m is encoded again; a rejected proposal shows the hidden columns again, an
accepted one keeps the new ones. That is DynamicCache.crop plus a restore on reject, done through the attention
mask so that many chains, each with its own m, share one cache and one forward per step. Each chain runs at its own
pace (a coroutine that asks for logits; see `_chain_program`), dead columns are compacted away and finished chains
leave the batch. `reuse_cache=False` (`_Reencode`) encodes prompt + x[:m] from scratch for every proposal and
extension and then decodes with a fresh cache, one chain at a time, as the official code does with HF `generate`:
the reference that bench/bench_power.py and the tests compare against. Every random number of a chain comes from
its own generator in program order, so both produce the same chains.

Cost: `forward_tokens` counts the tokens each chain fed through the model (prompt included); with cache reuse it
is exactly |prompt| − 1 + sampled_tokens. The paper's Eq. 12 estimates E[sampled] ≈ T + N·T²/(4B).
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache

from posttrain.generation.logits import sample_from_logps
from posttrain.generation.sampler import (
    FINISH_EOS,
    FINISH_LENGTH,
    SamplingParams,
    draw_seed,
    eos_ids_of,
)
from posttrain.ttc.mh import accept, log_acceptance


@dataclass(frozen=True)
class PowerParams:
    """alpha: the power α (proposal temperature 1/α); max_new_tokens: T; block_size: B; mcmc_steps: N_MCMC per
    block; position: how m is drawn ("block": U{0..L_k−1} as Alg. 1, "sequence": U{0..|x|−1} with the position
    term); ended: what a chain whose x has ended does in later blocks ("continue": keeps taking MH steps, exact;
    "stop": stops, as the paper's code; see the module docstring); stop_token_ids: None = the model's EOS; seed:
    None draws one from torch's global RNG."""

    alpha: float = 4.0
    max_new_tokens: int = 48
    block_size: int = 16
    mcmc_steps: int = 4
    position: Literal["block", "sequence"] = "block"
    ended: Literal["continue", "stop"] = "continue"
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.max_new_tokens < 1 or self.block_size < 1 or self.mcmc_steps < 0:
            raise ValueError("need max_new_tokens >= 1, block_size >= 1 and mcmc_steps >= 0")
        if self.position not in ("block", "sequence"):
            raise ValueError(f"position must be 'block' or 'sequence', got {self.position!r}")
        if self.ended not in ("continue", "stop"):
            raise ValueError(f"ended must be 'continue' or 'stop', got {self.ended!r}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.max_new_tokens / self.block_size)


@dataclass(frozen=True)
class PowerSample:
    """One chain's final completion. target_logps / proposal_logps: [T] log p and log p_prop of its tokens.
    proposed / accepted: MH proposals made and accepted; skipped: steps whose m fell past an ended x (no-ops).
    sampled_tokens: tokens drawn in all extensions and proposals; forward_tokens: tokens this chain fed through
    the model, prompt included."""

    token_ids: list[int]
    target_logps: list[float]
    proposal_logps: list[float]
    finish_reason: str
    proposed: int
    accepted: int
    skipped: int
    sampled_tokens: int
    forward_tokens: int
    text: str | None = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")


@dataclass(frozen=True)
class PowerRollouts:
    """samples [B][G]; wall_s for the whole call; forward_tokens = Σ over chains; computed_tokens adds the positions
    computed for padding and for chains idle during a batched step (zero for `reuse_cache=False`)."""

    samples: list[list[PowerSample]]
    wall_s: float
    forward_tokens: int
    computed_tokens: int

    @property
    def output_tokens(self) -> int:
        return sum(len(s.token_ids) for row in self.samples for s in row)


@dataclass
class _Chain:
    prompt: list[int]
    gen: torch.Generator
    x: list[int] = field(default_factory=list)
    tl: list[float] = field(default_factory=list)
    pl: list[float] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    skipped: int = 0
    sampled: int = 0
    forward_tokens: int = 0


@dataclass
class _Suffix:
    tokens: list[int] = field(default_factory=list)
    target_logps: list[float] = field(default_factory=list)
    proposal_logps: list[float] = field(default_factory=list)


# A chain is a coroutine that yields requests to its engine:
#   ("start", j)       resample from absolute position j: the engine sets up the prefix prompt + x[:j−c], computes the
#                      logits predicting position j and draws a token from p_prop -> receives (token, log p, log p_prop);
#   ("step", token)    feed the token just drawn; the engine draws the next one -> receives (token, log p, log p_prop);
#   ("keep", None)     the extension just drawn is kept (the engine forgets what it saved for a restore);
#   ("mh", proposal)   Eq. 9 for the proposal just drawn -> receives True (accept) or False.
# Engines serve many chains at once (one forward, one vectorized acceptance), but every random number of a chain
# comes from its own generator in the order the program asks for it, so the chain does not depend on the engine.


@dataclass
class _Proposal:
    m: int
    suffix: _Suffix


def _draw(chain: _Chain, m: int, end: int, stop: set[int]):
    """x[m:] from p_prop until a stop token or `end` completion tokens."""
    out = _Suffix()
    token, target, proposal = yield ("start", len(chain.prompt) + m)
    while True:
        out.tokens.append(token)
        out.target_logps.append(target)
        out.proposal_logps.append(proposal)
        if token in stop or m + len(out.tokens) >= end:
            return out
        token, target, proposal = yield ("step", token)


def _chain_program(chain: _Chain, params: PowerParams, stop: set[int]):
    """Algorithm 1 for one chain (the module docstring's steps 1-3)."""
    for k in range(params.num_blocks):
        end = min((k + 1) * params.block_size, params.max_new_tokens)
        if chain.x and chain.x[-1] in stop:  # 3. the completion ended in an earlier block
            if params.ended == "stop":
                return
        else:  # 1. extend to the block end from p_prop
            ext = yield from _draw(chain, len(chain.x), end, stop)
            yield ("keep", None)
            chain.x, chain.tl, chain.pl = (chain.x + ext.tokens, chain.tl + ext.target_logps,
                                           chain.pl + ext.proposal_logps)
            chain.sampled += len(ext.tokens)
        # 2. N_MCMC Metropolis-Hastings steps on π_k
        for _ in range(params.mcmc_steps):
            upper = end if params.position == "block" else len(chain.x)
            m = int(torch.randint(0, upper, (1,), generator=chain.gen))
            if m >= len(chain.x):
                chain.skipped += 1
                continue
            prop = yield from _draw(chain, m, end, stop)
            chain.sampled += len(prop.tokens)
            chain.proposed += 1
            if (yield ("mh", _Proposal(m, prop))):
                chain.accepted += 1
                chain.x, chain.tl, chain.pl = (chain.x[:m] + prop.tokens, chain.tl[:m] + prop.target_logps,
                                               chain.pl[:m] + prop.proposal_logps)


def _sample(logits: torch.Tensor, chains: list[_Chain], alpha: float) -> list[tuple[int, float, float]]:
    """One p_prop draw per chain from logits [n, V] (one uniform from each chain's generator):
    [(token, log p(token), log p_prop(token))]."""
    target = torch.log_softmax(logits, dim=-1)  # [n, V] log p
    proposal = torch.log_softmax(alpha * logits, dim=-1)  # [n, V] log p_prop = log softmax(α z), untruncated
    u = torch.cat([torch.rand(1, generator=c.gen, dtype=torch.float64) for c in chains])  # [n]
    tokens = sample_from_logps(proposal, u)  # [n]
    return list(zip(tokens.tolist(), target.gather(-1, tokens[:, None]).squeeze(-1).tolist(),
                    proposal.gather(-1, tokens[:, None]).squeeze(-1).tolist()))


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n][T_i] -> values [n, T], mask [n, T] (float64)."""
    width = max(1, max(len(r) for r in rows))
    values = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)
    return values, mask


def _decide(chains: list[_Chain], proposals: list[_Proposal], alpha: float, position: str) -> list[bool]:
    """Eq. 9 (ttc/mh.py) for several chains at once, over the FULL current suffix x[m:], then u < A with u from
    each chain's generator."""
    cur_t, cur_mask = _padded([c.tl[p.m:] for c, p in zip(chains, proposals)])  # [n, T]
    cur_p, _ = _padded([c.pl[p.m:] for c, p in zip(chains, proposals)])
    prop_t, prop_mask = _padded([p.suffix.target_logps for p in proposals])
    prop_p, _ = _padded([p.suffix.proposal_logps for p in proposals])
    if position == "sequence":  # P(m | x) = 1/|x|; the reverse move picks m with 1/|x'|
        log_position_ratio = torch.tensor([math.log(len(c.x)) - math.log(p.m + len(p.suffix.tokens))
                                           for c, p in zip(chains, proposals)], dtype=torch.float64)
    else:
        log_position_ratio = torch.zeros(len(chains), dtype=torch.float64)
    log_a = log_acceptance(alpha, cur_t, prop_t, cur_p, prop_p, cur_mask=cur_mask, prop_mask=prop_mask,
                           log_position_ratio=log_position_ratio)  # [n]
    u = torch.cat([torch.rand(1, generator=c.gen, dtype=torch.float64) for c in chains])  # [n]
    return accept(log_a, u).tolist()


class _Engine(abc.ABC):
    """Drives chain programs: answers "keep" and "mh" requests (vectorized over the chains asking), and leaves the
    logits requests to the subclass's forward step."""

    def __init__(self, chains: list[_Chain], params: PowerParams, stop: set[int]):
        self.chains, self.params = chains, params
        self.programs = {i: _chain_program(c, params, stop) for i, c in enumerate(chains)}
        self.pending: dict[int, tuple] = {}

    def _advance(self, i: int, value) -> None:
        try:
            self.pending[i] = self.programs[i].send(value)
        except StopIteration:
            self.pending.pop(i, None)
            self.finished(i)

    def _settle(self) -> None:
        """Resolve bookkeeping requests until every pending chain asks for logits."""
        while True:
            keeps = [i for i, r in self.pending.items() if r[0] == "keep"]
            mhs = [i for i, r in self.pending.items() if r[0] == "mh"]
            if not keeps and not mhs:
                return
            for i in keeps:
                self.accept(i)
                self._advance(i, None)
            if mhs:
                decisions = _decide([self.chains[i] for i in mhs], [self.pending[i][1] for i in mhs],
                                    self.params.alpha, self.params.position)
                for i, ok in zip(mhs, decisions):
                    if ok:
                        self.accept(i)
                    else:
                        self.reject(i)
                    self._advance(i, ok)

    def start_programs(self, ids) -> None:
        for i in ids:
            self._advance(i, None)
        self._settle()

    def finished(self, i: int) -> None:
        """Called once when chain i's program ends (subclasses release its resources)."""

    @abc.abstractmethod
    def accept(self, i: int) -> None:
        """Chain i keeps its proposal (subclasses commit its cached state)."""

    @abc.abstractmethod
    def reject(self, i: int) -> None:
        """Chain i keeps its current sample (subclasses drop the proposal's cached state)."""


class _MaskedCache(_Engine):
    """KV reuse for a batch of chains, each at its own pace: one forward per step serves every chain that wants
    logits (each feeds one token). The cache is append-only; chain i attends to its columns `cols[i]` (prompt + x,
    all but the last token) through the attention mask. A proposal from m hides the columns from position m−1 on
    (a mask edit; nothing before m is encoded again) and reject() shows them again. With one chain this is
    DynamicCache.crop plus a restore of the saved tensors; masks let chains with different m share a batch. Dead
    columns are dropped by compaction, finished chains leave the batch."""

    def __init__(self, model: nn.Module, chains: list[_Chain], params: PowerParams, stop: set[int], pad_token_id: int):
        super().__init__(chains, params, stop)
        self.model, self.pad = model, pad_token_id
        self.device = next(model.parameters()).device
        self.cache = DynamicCache()
        self.rows = list(range(len(chains)))  # batch row -> chain index
        self.row_of = {i: i for i in self.rows}
        self.cols: list[list[int]] = [[] for _ in chains]  # per chain
        self._saved: dict[int, tuple[list[int], int]] = {}
        self._done: list[int] = []
        self.computed_tokens = 0
        heads = [c.prompt[:-1] for c in chains]
        P = max(len(h) for h in heads)
        mask = torch.zeros((len(chains), P), dtype=torch.long, device=self.device)
        if P:  # prefill every prompt but its last token, left-padded
            ids = torch.full((len(chains), P), pad_token_id, dtype=torch.long, device=self.device)
            for i, h in enumerate(heads):
                if h:
                    ids[i, P - len(h):] = torch.tensor(h, device=self.device)
                    mask[i, P - len(h):] = 1
                self.cols[i] = list(range(P - len(h), P))
                chains[i].forward_tokens += len(h)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                       use_cache=True, logits_to_keep=1)
            self.computed_tokens = len(chains) * P
        self.mask = mask  # [rows, columns]: 1 where the row's chain sees the column
        self.columns = P

    def _hide_from(self, i: int, j: int) -> tuple[int, int]:
        """Hide seq[j−1:] of chain i (saving its columns); return (token, position) to feed: seq[j−1]."""
        chain, cols = self.chains[i], self.cols[i]
        self._saved[i] = (cols, self.columns)
        if j - 1 < len(cols):  # columns are in sequence order, so the hidden part is a column suffix
            self.mask[self.row_of[i], cols[j - 1]:] = 0
        self.cols[i] = cols[:j - 1]
        return (chain.prompt + chain.x)[j - 1], j - 1

    def accept(self, i: int) -> None:
        self._saved.pop(i, None)

    def reject(self, i: int) -> None:
        self.cols[i], first_new = self._saved.pop(i)
        row = self.row_of[i]
        self.mask[row, first_new:] = 0
        if self.cols[i]:
            self.mask[row, self.cols[i]] = 1

    def finished(self, i: int) -> None:
        self._done.append(i)

    def _feed(self, requests: dict[int, tuple[int, int]]) -> torch.Tensor:
        """Append one column: chain i feeds token requests[i][0] at position requests[i][1]. -> logits [rows, V]."""
        ids, pos, new = [self.pad] * len(self.rows), [0] * len(self.rows), [0] * len(self.rows)
        for i, (token, position) in requests.items():
            row = self.row_of[i]
            ids[row], pos[row], new[row] = token, position, 1
            self.cols[i].append(self.columns)
            self.chains[i].forward_tokens += 1
        self.mask = torch.cat([self.mask, torch.tensor(new, device=self.device)[:, None]], dim=1)
        out = self.model(input_ids=torch.tensor(ids, device=self.device)[:, None], attention_mask=self.mask,
                         position_ids=torch.tensor(pos, device=self.device)[:, None], past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.columns += 1
        self.computed_tokens += len(self.rows)
        return out.logits[:, -1, :].float()  # [rows, V]

    def _drop_finished(self) -> None:
        if not self._done:
            return
        done, self._done = set(self._done), []
        keep = [row for row, i in enumerate(self.rows) if i not in done]
        self.rows = [self.rows[row] for row in keep]
        self.row_of = {i: row for row, i in enumerate(self.rows)}
        if keep:
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask = self.mask[index]

    def _compact(self) -> None:
        """Gather each row's live columns (visible ones, plus those a pending proposal may give back) into a
        left-padded cache, dropping dead columns; column indices in `cols` and `_saved` are remapped."""
        live = {i: sorted(set(self.cols[i]) | set(self._saved[i][0] if i in self._saved else ())) for i in self.rows}
        width = max(len(c) for c in live.values())
        if self.columns <= 2 * width + 32:
            return
        N = len(self.rows)
        index = torch.zeros((N, width), dtype=torch.long, device=self.device)
        mask = torch.zeros((N, width), dtype=torch.long, device=self.device)
        for row, i in enumerate(self.rows):
            offset = width - len(live[i])
            if live[i]:
                index[row, offset:] = torch.tensor(live[i], device=self.device)
            new_index = {c: offset + k for k, c in enumerate(live[i])}
            self.cols[i] = [new_index[c] for c in self.cols[i]]
            if self.cols[i]:
                mask[row, self.cols[i]] = 1
            if i in self._saved:
                saved, first_new = self._saved[i]
                self._saved[i] = ([new_index[c] for c in saved], offset + sum(c < first_new for c in live[i]))
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            H, D = layer.keys.shape[1], layer.keys.shape[3]
            idx = index[:, None, :, None].expand(N, H, width, D)
            layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        self.mask, self.columns = mask, width

    def run(self) -> None:
        self.start_programs(list(self.programs))
        while self.pending:
            self._drop_finished()
            # a chain's visible columns are exactly the positions before the token it feeds
            requests = {i: self._hide_from(i, r[1]) if r[0] == "start" else (r[1], len(self.cols[i]))
                        for i, r in self.pending.items()}
            logits = self._feed(requests)  # [rows, V]
            asking = list(requests)
            draws = _sample(logits[[self.row_of[i] for i in asking]], [self.chains[i] for i in asking],
                            self.params.alpha)
            for i, draw in zip(asking, draws):
                self._advance(i, draw)
            self._settle()
            if self.pending:
                self._drop_finished()
                self._compact()


class _Reencode(_Engine):
    """The straightforward reference: every draw encodes prompt + x[:m] from scratch, one chain at a time."""

    def __init__(self, model: nn.Module, chains: list[_Chain], params: PowerParams, stop: set[int], pad_token_id: int):
        super().__init__(chains, params, stop)
        self.model = model
        self.device = next(model.parameters()).device
        self.computed_tokens = 0

    def _feed(self, i: int, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        self.chains[i].forward_tokens += len(ids)
        self.computed_tokens += len(ids)
        return out.logits[:, -1, :].float()  # [1, V]

    def accept(self, i: int) -> None:
        pass

    def reject(self, i: int) -> None:
        pass

    def run(self) -> None:
        for i, chain in enumerate(self.chains):
            cache = None
            self.start_programs([i])
            while i in self.pending:
                kind, value = self.pending[i]
                if kind == "start":
                    cache = DynamicCache()
                    logits = self._feed(i, (chain.prompt + chain.x)[:value], cache)
                else:
                    logits = self._feed(i, [value], cache)
                self._advance(i, _sample(logits, [chain], self.params.alpha)[0])
                self._settle()


class PowerSampler:
    """Power sampling over a transformers causal LM (or anything with its forward interface, e.g. toy.TableLM).

    batch_size: chains run together with KV-cache reuse, each at its own pace (one forward per step serves every
    chain that needs logits); each chain is still exactly Alg. 1 with its own randomness. reuse_cache=False
    selects the re-encoding reference (one chain at a time).
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None, reuse_cache: bool = True, batch_size: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (self.eos_token_ids or (0,))[0])
        self.reuse_cache = reuse_cache
        self.batch_size = batch_size

    def _finish(self, c: _Chain, stop: set[int]) -> PowerSample:
        text = self.tokenizer.decode(c.x, skip_special_tokens=True) if self.tokenizer is not None else None
        return PowerSample(token_ids=c.x, target_logps=c.tl, proposal_logps=c.pl,
                           finish_reason=FINISH_EOS if c.x and c.x[-1] in stop else FINISH_LENGTH,
                           proposed=c.proposed, accepted=c.accepted, skipped=c.skipped, sampled_tokens=c.sampled,
                           forward_tokens=c.forward_tokens, text=text)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: PowerParams, n: int = 1) -> PowerRollouts:
        """n independent chains per prompt -> samples [B][G]. Chain i (= b·G + g) has its own generator, seeded
        from a seed stream started at params.seed, so results do not depend on batch_size or reuse_cache."""
        if n < 1 or not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("power sampling needs n >= 1 and non-empty prompts")
        start = time.perf_counter()
        stop = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        stream = torch.Generator().manual_seed(params.seed if params.seed is not None else draw_seed())
        seeds = torch.randint(0, 2**62, (len(prompt_ids) * n,), generator=stream).tolist()
        chains = [_Chain(prompt=list(p), gen=torch.Generator().manual_seed(seeds[b * n + g]))
                  for b, p in enumerate(prompt_ids) for g in range(n)]
        was_training = self.model.training
        self.model.eval()
        computed = 0
        try:
            size = self.batch_size if self.reuse_cache else len(chains)
            for lo in range(0, len(chains), size):
                batch = chains[lo:lo + size]
                engine = (_MaskedCache if self.reuse_cache else _Reencode)(self.model, batch, params, stop,
                                                                           self.pad_token_id)
                engine.run()
                computed += engine.computed_tokens
        finally:
            self.model.train(was_training)
        flat = [self._finish(c, stop) for c in chains]
        return PowerRollouts(samples=[flat[b * n:(b + 1) * n] for b in range(len(prompt_ids))],
                             wall_s=time.perf_counter() - start, forward_tokens=sum(c.forward_tokens for c in chains),
                             computed_tokens=computed)

    def sample(self, prompt_ids: Sequence[int], params: PowerParams) -> PowerSample:
        """One chain."""
        return self.generate([list(prompt_ids)], params, n=1).samples[0][0]


def low_temperature_params(alpha: float, max_new_tokens: int, *, seed: int | None = None,
                           stop_token_ids: Sequence[int] | None = None) -> SamplingParams:
    """The baseline: token-by-token sampling from softmax(α·z), i.e. temperature 1/α, no top-k/top-p.

    This is NOT p^α: low temperature exponentiates each conditional, p(x_t | x_<t)^α / Z_t, while p^α exponentiates
    the whole sequence's probability, which sums over futures before exponentiating (Karan & Du 2025).
    """
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0 / alpha, seed=seed,
                          stop_token_ids=tuple(stop_token_ids) if stop_token_ids is not None else None)

