"""Multi-turn episodes on a token-in/token-out generation engine: vLLM (colocated or `posttrain serve`) or any object
with the `Generator` interface `generate(prompt_ids, params, n) -> Rollouts` (HFGenerator too).

`EngineEpisodeSampler.run(make_env, rows, params, n=G, budget=...)` plays the same episodes as `EpisodeSampler` (the
same controller: reset, stop rules, environment steps, observation rendering, budgets; see episodes.py) but each model
turn is one engine request per live episode:

    context = prompt ids + every token of the episode so far (sampled ids and observation ids, as ids)
    turn    = engine.generate([context], max_new_tokens = the turn's cap, stop = the episode's stop strings,
                              prompt_seeds = (mix_seed(episode seed, turn),))

Nothing is re-tokenized: the engine receives token ids (vLLM: `TokensPrompt(prompt_token_ids=...)`) and returns
token ids, and an observation is appended as the ids the tokenizer gives for the observation alone. vLLM's prefix
cache (on by default) holds the blocks of the context it has seen, so a turn computes only the tokens after the cached
prefix: the observation and what it samples. The returned tokens are cut by the own sampler's stop rule (end-of-turn
token, then stop string on the decoded tail, then the cap), so a turn ends at the same token under either engine.
Log-probs are the engine's for the sampled tokens (vLLM: `processed_logprobs`, under the filtered distribution they
were drawn from, as the own sampler records them), 0 on observation tokens (model_mask 0: out of loss and
normaliser, see envs/rl.py).

Seeds: episode g of row b draws from mix_seed(s_b, g) (episodes.episode_seeds), a new request seed per turn, so an
episode does not depend on the rows beside it or on how a step's rows are split across ranks. vLLM draws with its own
RNG: the same seeds give reproducible but different tokens from EpisodeSampler's (greedy decoding gives the same).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.errors import ConfigError
from posttrain.generation.episodes import (
    EpisodeBudget,
    Episodes,
    EpisodeSampler,
    check_run,
    episode_seeds,
    mix_seed,
)
from posttrain.generation.sampler import SamplingParams


class EngineEpisodeSampler(EpisodeSampler):
    """Multi-turn rollouts through `engine.generate` (see the module docstring). tokenizer: the trainer's (renders
    prompts and observations, decodes turns for the environment); eos_token_ids: end-of-turn tokens (default: the
    engine's)."""

    def __init__(self, engine, tokenizer, *, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None):
        self.engine, self.model, self.tokenizer = engine, None, tokenizer
        eos = eos_token_ids if eos_token_ids is not None else getattr(engine, "eos_token_ids", None)
        if eos is None:
            raise ValueError("EngineEpisodeSampler needs eos_token_ids (the engine has none)")
        self.eos_token_ids = tuple(int(t) for t in eos)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (self.eos_token_ids or (0,))[0])

    def run(self, make_env: Callable[[], Any], rows: Sequence[dict[str, Any]], params: SamplingParams, n: int = 1,
            budget: EpisodeBudget | None = None, row_indices: Sequence[int] | None = None) -> Episodes:
        """Play n episodes per row (as EpisodeSampler.run); params.prompt_seeds: one seed per row."""
        budget, row_indices = check_run(rows, n, budget, row_indices)
        start = time.perf_counter()
        envs, episodes, stops = self.start(make_env, list(rows), row_indices, params, n, budget)
        limit = getattr(self.engine, "max_model_len", None)
        longest = max(range(len(episodes)), key=lambda i: len(episodes[i].prompt_ids))
        if limit is not None and len(episodes[longest].prompt_ids) + budget.max_episode_tokens > limit:
            raise ConfigError(f"row {episodes[longest].row_index}: its prompt ({len(episodes[longest].prompt_ids)} "
                              f"tokens) plus max_episode_tokens ({budget.max_episode_tokens}) exceeds the engine's "
                              f"max_model_len ({limit}); raise vllm_max_model_len or lower max_episode_tokens")
        seeds = episode_seeds(params, len(rows), n)
        stop_ids = tuple(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        out = Episodes(episodes, n)
        out.prefill_tokens = sum(len(p) for p in {tuple(e.prompt_ids) for e in episodes})
        live = list(range(len(episodes)))
        for turn in range(1, budget.max_turns + 1):
            caps = {i: min(budget.max_turn_tokens, budget.max_episode_tokens - len(episodes[i].token_ids))
                    for i in live}
            # one engine call per (cap, stop strings): requests in a call share everything but context and seed
            calls: dict[tuple[int, tuple[str, ...]], list[int]] = {}
            for i in live:
                calls.setdefault((caps[i], stops[i]), []).append(i)
            sampled: dict[int, tuple[list[int], list[float], str]] = {}
            for (cap, stop), ids in calls.items():
                call = SamplingParams(max_new_tokens=cap, temperature=params.temperature, top_k=params.top_k,
                                      top_p=params.top_p, stop=stop, stop_token_ids=stop_ids,
                                      prompt_seeds=tuple(mix_seed(seeds[i], turn) for i in ids))
                result = self.engine.generate([episodes[i].prompt_ids + episodes[i].token_ids for i in ids], call, 1)
                for k, i in enumerate(ids):
                    sampled[i] = (result.token_lists()[k], result.logps_lists()[k], result.finish_reasons[k])
            keep: list[int] = []
            for i in live:
                e = episodes[i]
                tokens, logps, reason = self.cut_turn(*sampled[i], stops[i], stop_ids, caps[i])
                e.token_ids += tokens
                e.model_mask += [1] * len(tokens)
                e.logps += logps
                out.decode_tokens += len(tokens)
                obs = self.end_turn(e, envs[i], tokens, reason, turn, budget)
                if obs is not None:
                    out.observation_tokens += len(obs)
                    keep.append(i)
            live = keep
            if not live:
                break
        out.wall_s = time.perf_counter() - start
        return out

    def cut_turn(self, tokens: list[int], logps: list[float], finish: str, stop: tuple[str, ...],
                 stop_ids: Sequence[int], cap: int) -> tuple[list[int], list[float], str]:
        """The engine's turn cut where EpisodeSampler would have ended it: after the first end-of-turn token, else
        after the token that completes a stop string (decoded tail), else at the cap; (tokens, logps, reason)."""
        if len(logps) != len(tokens):
            raise RuntimeError(f"the engine returned {len(logps)} log-probs for {len(tokens)} tokens")
        window = 4 * max((len(s) for s in stop), default=0) + 4
        ends = set(stop_ids)
        for k, token in enumerate(tokens):
            if token in ends:
                return tokens[:k + 1], logps[:k + 1], "eos"
            if stop and self._hit_stop(tokens[max(0, k + 1 - window):k + 1], stop):
                return tokens[:k + 1], logps[:k + 1], "stop_string"
            if k + 1 >= cap:
                return tokens[:k + 1], logps[:k + 1], "length"
        return list(tokens), list(logps), finish
