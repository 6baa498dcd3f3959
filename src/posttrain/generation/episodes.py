"""Multi-turn rollouts: the model talks to an environment for several turns, continuing from its KV cache.

`EpisodeSampler.run(make_env, rows, params, n=G, budget=...)` plays G episodes for each of B dataset rows (N = B·G,
episode i belongs to row i // G) with one environment instance each (posttrain.envs.base):

1. Reset: each environment turns its row into prompt messages; they are rendered with the chat template (with the
   environment's `chat_tools`, if any) and tokenized. Identical prompts are encoded once and their cache rows shared.
2. Model turn: every live episode samples tokens exactly as the single-turn engine (sampler.py) does: from the
   filtered distribution (logits.py), recording each token's log-prob under it (greedy: under the temperature-1
   model), until an end-of-turn token, one of the environment's stop strings (ReAct's `Observation:`) or the turn's
   token budget. Episodes that finish their turn early wait: they are fed a masked pad so the batch stays aligned,
   which leaves a masked hole in their cache row.
3. Environment step: the decoded text of the turn goes to `env.step`; the reward is recorded; a finished episode
   leaves the batch (its cache row is dropped).
4. Observation: the observation's tokens (text appended as is, or chat messages rendered by the template as new
   turns after the model's end-of-turn token) are appended to the cache in one forward pass, and the next turn
   continues from there. Nothing the model wrote is re-tokenized or re-encoded (token-in, token-out): an episode's
   tokens are the prompt, then the sampled ids and the observation ids in order, and `model_mask` tells them apart.

Position ids count only real tokens, so the cached computation equals a teacher-forced forward over the
concatenated tokens (tests/envs check log-probs and tokens against re-encoding the whole history at every step).
Budgets (`EpisodeBudget`): model turns, tokens per model turn, and tokens per episode after the prompt (model and
observation tokens); an episode that runs out ends cleanly with finish reason "max_turns" or "max_tokens".
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from posttrain.envs.base import (
    EnvError,
    Observation,
    checked_reset,
    checked_step,
    env_name,
)
from posttrain.generation.logits import filtered_logps, sample_from_logps
from posttrain.generation.sampler import SamplingParams, draw_seed, eos_ids_of

FINISH_DONE = "done"  # the environment ended the episode
FINISH_TURNS = "max_turns"  # the turn budget ran out before the environment said done
FINISH_TOKENS = "max_tokens"  # the episode's token budget ran out


@dataclass(frozen=True)
class EpisodeBudget:
    """max_turns: model turns per episode; max_turn_tokens: tokens sampled per turn; max_episode_tokens: tokens after
    the prompt (model + observation); env_timeout_s: limit on each reset/step call (None: no limit)."""

    max_turns: int = 4
    max_turn_tokens: int = 128
    max_episode_tokens: int = 512
    env_timeout_s: float | None = 60.0

    def __post_init__(self):
        for name in ("max_turns", "max_turn_tokens", "max_episode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Episode:
    """One episode. token_ids: everything after the prompt, in order; model_mask[t] = 1 where the model sampled
    token t; logps[t]: its log-prob under the sampling distribution (0 on observation tokens). turn_texts: decoded
    model turns; observations: what the environment returned after each turn; turn_rewards / infos: per step."""

    row_index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    model_mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    observations: list[Observation | None] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    finish: str = ""

    @property
    def reward(self) -> float:
        """The episode's reward: the sum of its step rewards (the verifier's score is the last step's)."""
        return float(sum(self.turn_rewards))

    @property
    def verifier(self) -> float | None:
        """The verifier's score if the environment reported one (info["verifier"]), else None."""
        scores = [i["verifier"] for i in self.infos if "verifier" in i]
        return float(scores[-1]) if scores else None

    @property
    def model_tokens(self) -> int:
        return int(sum(self.model_mask))

    @property
    def turns(self) -> int:
        return len(self.turn_texts)

    def tool_calls(self) -> dict[str, int]:
        """Counts of info["tool_call"] values (e.g. valid, failed, malformed, unknown_tool)."""
        counts: dict[str, int] = {}
        for info in self.infos:
            if "tool_call" in info:
                counts[info["tool_call"]] = counts.get(info["tool_call"], 0) + 1
        return counts


@dataclass
class Episodes:
    """N = B·G episodes, row-major (episode i is sample i % n of row i // n), and their cost in tokens fed through
    the model: prefill (prompts, each distinct prompt once), decode (sampled tokens), observation tokens, and masked
    padding (waiting rows and ragged observation chunks)."""

    episodes: list[Episode]
    n: int
    prefill_tokens: int = 0
    decode_tokens: int = 0
    observation_tokens: int = 0
    padding_tokens: int = 0
    wall_s: float = 0.0

    @property
    def forward_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens + self.observation_tokens

    def __len__(self) -> int:
        return len(self.episodes)


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [n, W], mask [n, W]) left-padded to the longest, so every row's last column is real."""
    W = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), W), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), W), dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        ids[i, W - len(s):] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[i, W - len(s):] = 1
    return ids, mask


def mix_seed(*parts: int) -> int:
    """A 31-bit seed that depends on `parts` only (the same in every process, unlike hash())."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def episode_seeds(params: SamplingParams, rows: int, n: int) -> list[int]:
    """One seed per episode (rows × n, row-major): episode g of row b gets mix_seed(s_b, g), where s_b is
    params.prompt_seeds[b] when given (what a row samples does not depend on the rows beside it, so a step split
    across ranks samples the same episodes as one process), else mix_seed(params.seed, b) (params.seed None: one
    seed drawn from torch's global RNG)."""
    if params.prompt_seeds is not None:
        if len(params.prompt_seeds) != rows:
            raise ValueError(f"prompt_seeds has {len(params.prompt_seeds)} seeds for {rows} rows")
        row_seeds = list(params.prompt_seeds)
    else:
        base = params.seed if params.seed is not None else draw_seed()
        row_seeds = [mix_seed(base, b) for b in range(rows)]
    return [mix_seed(s, g) for s in row_seeds for g in range(n)]


def check_run(rows: Sequence[Any], n: int, budget: EpisodeBudget | None, row_indices: Sequence[int] | None,
              ) -> tuple[EpisodeBudget, list[int]]:
    """The arguments every episode engine's `run` checks: (budget or the default, row numbers or 0..B-1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not rows:
        raise ValueError("run needs at least one row")
    return budget or EpisodeBudget(), list(row_indices) if row_indices is not None else list(range(len(rows)))


@dataclass
class _Live:
    """Per-row state of the episodes still in the cache (index j = cache row)."""

    ids: list[int]  # global episode index
    pending: list[int | None]  # last sampled token not yet fed to the model


class EpisodeSampler:
    """KV-cached multi-turn rollouts for a transformers causal LM (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (self.eos_token_ids or (0,))[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- rendering ----------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, prompt: Observation, env: Any = None) -> list[int]:
        """Token ids of a reset observation: chat messages rendered with the generation prompt (and the
        environment's `chat_tools`); a string is sent as one user message."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        tools = getattr(env, "chat_tools", None)
        kwargs = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return self._ids(text)

    def observation_ids(self, observation: Observation, closed: bool, env: Any = None) -> list[int]:
        """Token ids appended after a model turn. Text after an open turn is appended as is; text after a closed turn
        (the model emitted its end-of-turn token) and chat messages become new turns rendered by the chat template,
        ending with the assistant header. An open turn followed by messages first gets the end-of-turn token."""
        if isinstance(observation, str) and not closed:
            return self._ids(observation)
        messages = [{"role": "user", "content": observation}] if isinstance(observation, str) else observation
        tools = getattr(env, "chat_tools", None)
        kwargs = {"tools": tools} if tools else {}
        base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        before = self.tokenizer.apply_chat_template(base, tokenize=False, **kwargs)
        after = self.tokenizer.apply_chat_template(base + messages, tokenize=False, add_generation_prompt=True, **kwargs)
        eos_text = self.tokenizer.decode(list(self.eos_token_ids[:1])) if self.eos_token_ids else ""
        end = before.rfind("a") + 1  # the assistant's content ends here; its end-of-turn token follows
        if eos_text and before.startswith(eos_text, end):
            end += len(eos_text)
        if not after.startswith(before[:end]):
            raise EnvError(f"environment '{env_name(env)}': the chat template does not render the conversation as a "
                           "growing prefix, so observation messages cannot be appended token by token")
        prefix = [] if closed else list(self.eos_token_ids[:1])
        return prefix + self._ids(after[end:])

    # ---- the engine ---------------------------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()  # [rows, V]

    @torch.no_grad()
    def run(self, make_env: Callable[[], Any], rows: Sequence[dict[str, Any]], params: SamplingParams, n: int = 1,
            budget: EpisodeBudget | None = None, row_indices: Sequence[int] | None = None) -> Episodes:
        """Play n episodes per row; row_indices: the rows' numbers in their dataset (for error messages).
        params gives the sampling rule and stop strings; the token limits come from `budget` (max_turn_tokens per
        turn, not params.max_new_tokens)."""
        budget, row_indices = check_run(rows, n, budget, row_indices)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run(make_env, list(rows), row_indices, params, n, budget)
        finally:
            self.model.train(was_training)

    def _run(self, make_env, rows, row_indices, params: SamplingParams, G: int, budget: EpisodeBudget) -> Episodes:
        start = time.perf_counter()
        device = self.device
        N = len(rows) * G
        envs, episodes, stops = self.start(make_env, rows, row_indices, params, G, budget)
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        out = Episodes(episodes, G)

        # 1. prefill each distinct prompt once, left-padded; share its cache row among the episodes that use it
        distinct: dict[tuple[int, ...], int] = {}
        for e in episodes:
            distinct.setdefault(tuple(e.prompt_ids), len(distinct))
        prompts = list(distinct)
        input_ids, attention_mask = _left_pad(prompts, self.pad_token_id, device)  # [U, P]
        P = input_ids.shape[1]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
        cache = DynamicCache()
        logits = self._forward(input_ids, attention_mask, position_ids, cache)  # [U, V]
        out.prefill_tokens = sum(len(p) for p in prompts)
        out.padding_tokens = len(prompts) * P - out.prefill_tokens
        share = torch.tensor([distinct[tuple(e.prompt_ids)] for e in episodes], device=device)  # [N]
        cache.batch_select_indices(share)
        logits, attention_mask = logits[share], attention_mask[share]  # [N, V], [N, P]
        next_pos = torch.tensor([len(e.prompt_ids) for e in episodes], device=device)  # [N]
        live = _Live(ids=list(range(N)), pending=[None] * N)
        # one generator per episode, drawn only when the episode samples: its draws do not depend on the batch
        generators = [torch.Generator(device=device).manual_seed(s) for s in episode_seeds(params, len(rows), G)]

        for turn in range(1, budget.max_turns + 1):
            # 2. one model turn for every live episode
            n_live = len(live.ids)
            caps = [min(budget.max_turn_tokens, budget.max_episode_tokens - len(episodes[i].token_ids))
                    for i in live.ids]
            turn_tokens: list[list[int]] = [[] for _ in range(n_live)]
            reason: list[str | None] = [None] * n_live
            stop_window = [4 * max((len(s) for s in stops[i]), default=0) + 4 for i in live.ids]
            for step in range(max(caps)):
                u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64, device=device)
                               if reason[j] is None else torch.full((1,), 0.5, dtype=torch.float64, device=device)
                               for j, i in enumerate(live.ids)])  # [n_live]
                if params.greedy:
                    step_logps = torch.log_softmax(logits, dim=-1)
                    tok = logits.argmax(dim=-1)  # [n_live]
                else:
                    step_logps = filtered_logps(logits, temperature=params.temperature, top_k=params.top_k,
                                                top_p=params.top_p)
                    tok = sample_from_logps(step_logps, u)
                tok_logps = step_logps.gather(-1, tok[:, None]).squeeze(-1).tolist()
                tok_list = tok.tolist()
                feed = torch.zeros(n_live, dtype=torch.bool)  # rows that sampled this step
                for j, i in enumerate(live.ids):
                    if reason[j] is not None:
                        continue
                    e = episodes[i]
                    feed[j] = True
                    turn_tokens[j].append(tok_list[j])
                    e.token_ids.append(tok_list[j])
                    e.model_mask.append(1)
                    e.logps.append(tok_logps[j])
                    if tok_list[j] in stop_ids:
                        reason[j] = "eos"
                    elif stops[i] and self._hit_stop(turn_tokens[j][-stop_window[j]:], stops[i]):
                        reason[j] = "stop_string"
                    elif len(turn_tokens[j]) >= caps[j]:
                        reason[j] = "length"
                out.decode_tokens += int(feed.sum())
                if all(r is not None for r in reason):
                    for j in range(n_live):
                        if feed[j]:
                            live.pending[j] = tok_list[j]
                    break
                # feed the sampled tokens; rows whose turn is over get a masked pad
                feed_d = feed.to(device)
                feed_ids = torch.where(feed_d, tok, torch.full_like(tok, self.pad_token_id))
                attention_mask = torch.cat([attention_mask, feed_d.long()[:, None]], dim=-1)
                logits = self._forward(feed_ids[:, None], attention_mask, next_pos[:, None], cache)
                next_pos = next_pos + feed_d.long()
                out.padding_tokens += int((~feed).sum())

            # 3. environment steps; 4. observations
            keep: list[int] = []
            chunks: list[list[int]] = []
            for j, i in enumerate(live.ids):
                obs = self.end_turn(episodes[i], envs[i], turn_tokens[j], reason[j], turn, budget)
                if obs is None:
                    continue
                pending = live.pending[j]
                chunks.append(([pending] if pending is not None else []) + obs)
                keep.append(j)
            if not keep:
                break
            keep_t = torch.tensor(keep, device=device)
            if len(keep) < n_live:  # finished episodes leave the batch
                cache.batch_select_indices(keep_t)
                attention_mask, next_pos = attention_mask[keep_t], next_pos[keep_t]
            pendings = [live.pending[j] for j in keep]
            live = _Live(ids=[live.ids[j] for j in keep], pending=[None] * len(keep))
            # append each episode's chunk (its pending model token + the observation), left-padded to one length
            chunk_ids, chunk_mask = _left_pad(chunks, self.pad_token_id, device)  # [n, O]
            chunk_pos = next_pos[:, None] + (chunk_mask.cumsum(-1) - 1).clamp(min=0)  # [n, O]
            attention_mask = torch.cat([attention_mask, chunk_mask], dim=-1)
            logits = self._forward(chunk_ids, attention_mask, chunk_pos, cache)
            next_pos = next_pos + chunk_mask.sum(-1)
            out.observation_tokens += int(chunk_mask.sum()) - sum(p is not None for p in pendings)
            out.padding_tokens += int((1 - chunk_mask).sum())
        out.wall_s = time.perf_counter() - start
        return out

    def start(self, make_env: Callable[[], Any], rows: Sequence[dict[str, Any]], row_indices: Sequence[int],
              params: SamplingParams, G: int, budget: EpisodeBudget,
              ) -> tuple[list[Any], list[Episode], list[tuple[str, ...]]]:
        """One environment per episode (N = rows × G, row-major), reset on its row (checked) and its prompt
        rendered: (environments, empty episodes, each episode's stop strings: params.stop + the environment's)."""
        envs = [make_env() for _ in range(len(rows) * G)]
        episodes: list[Episode] = []
        for i, env in enumerate(envs):
            r = i // G
            prompt = checked_reset(env, rows[r], row_indices[r], budget.env_timeout_s)
            ids = self.prompt_ids(prompt, env)
            if not ids:
                raise EnvError(f"environment '{env_name(env)}', row {row_indices[r]}: reset gave an empty prompt")
            episodes.append(Episode(row_index=row_indices[r], prompt_ids=ids))
        stops = [tuple(params.stop) + tuple(getattr(env, "stop", ()) or ()) for env in envs]
        return envs, episodes, stops

    def end_turn(self, e: Episode, env: Any, turn_tokens: list[int], reason: str | None, turn: int,
                 budget: EpisodeBudget) -> list[int] | None:
        """After a model turn (its tokens already in `e`): decode it, step the environment, record the reward, and
        append the observation's tokens (masked: model_mask 0, log-prob 0). Returns the observation's ids, or None
        when the episode is over (done, or a turn or token budget ran out: e.finish says which)."""
        text = self.tokenizer.decode(turn_tokens, skip_special_tokens=True)
        e.turn_texts.append(text)
        if reason == "length" and len(e.token_ids) >= budget.max_episode_tokens:
            e.finish = FINISH_TOKENS
            return None
        result = checked_step(env, text, e.row_index, turn, budget.env_timeout_s)
        e.turn_rewards.append(float(result.reward))
        e.infos.append(dict(result.info))
        e.observations.append(result.observation)
        if result.done:
            e.finish = FINISH_DONE
            return None
        if turn == budget.max_turns:
            e.finish = FINISH_TURNS
            return None
        assert result.observation is not None  # checked_step guarantees it for done=False
        obs = self.observation_ids(result.observation, closed=reason == "eos", env=env)
        if len(e.token_ids) + len(obs) >= budget.max_episode_tokens:
            e.finish = FINISH_TOKENS  # no room for the observation and one more model token
            return None
        e.token_ids += obs
        e.model_mask += [0] * len(obs)
        e.logps += [0.0] * len(obs)
        return obs

    def _hit_stop(self, tail: list[int], stop: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in stop)


def play_scripted(sampler: EpisodeSampler, env: Any, row: dict[str, Any], texts: Sequence[str], *,
                  budget: EpisodeBudget | None = None, row_index: int = 0) -> Episode:
    """One episode where the model's turns are fixed texts: the same controller as `EpisodeSampler.run` (checked
    reset and steps, observation rendering, budgets, reward sum), without a model. A text that ends with the
    end-of-turn token's text closes its turn. Used for tool-use demonstrations (SFT data with the observations
    masked out) and to test environments. log-probs are 0; the turns run out when `texts` does (finish "max_turns")."""
    budget = budget or EpisodeBudget()
    prompt = checked_reset(env, row, row_index, budget.env_timeout_s)
    episode = Episode(row_index=row_index, prompt_ids=sampler.prompt_ids(prompt, env))
    eos_text = sampler.tokenizer.decode(list(sampler.eos_token_ids[:1])) if sampler.eos_token_ids else ""
    for turn, text in enumerate(texts[:budget.max_turns], start=1):
        closed = bool(eos_text) and text.endswith(eos_text)
        body = text[:-len(eos_text)] if closed else text
        ids = (sampler._ids(body) + (list(sampler.eos_token_ids[:1]) if closed else []))[:budget.max_turn_tokens]
        room = budget.max_episode_tokens - len(episode.token_ids)
        episode.token_ids += ids[:room]
        episode.model_mask += [1] * len(ids[:room])
        episode.logps += [0.0] * len(ids[:room])
        reason = "length" if len(ids) >= room else ("eos" if closed else "script")
        if sampler.end_turn(episode, env, ids[:room], reason, turn, budget) is None:
            return episode
    episode.finish = FINISH_TURNS
    return episode
