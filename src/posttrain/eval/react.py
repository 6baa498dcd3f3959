"""The `react` evaluation strategy: a frozen model answers with tools through the ReAct controller (Yao et al. 2023).

Each problem becomes a ToolEnv episode (posttrain.envs): the model writes Thought / Action lines, the controller runs
the tool and appends the observation, until `Final Answer:` or the turn / token budget. The final answer is scored by
the task's own `score`, exactly as the other strategies' completions are, so prompting with tools and RL with tools sit
in the same table. Extra metrics: tool calls per episode by status, tool-call validity (valid / attempted calls),
turns per episode and how episodes ended.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from posttrain.envs.formats import ToolFormatName
from posttrain.envs.rl import episode_metrics
from posttrain.envs.tool_env import ToolEnv, question_of
from posttrain.eval.metrics import majority_at_k, mean_stderr, pass_at_k
from posttrain.eval.tasks import Problem, Task
from posttrain.generation.engine_episodes import EngineEpisodeSampler
from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
from posttrain.generation.sampler import SamplingParams
from posttrain.generation.strategies import DecodeOptions


def problem_question(problem: Problem) -> str:
    """The bare question of a problem (a reasoning-gym entry's question; else its prompt's last user turn)."""
    if "entry" in problem.data:
        return question_of({"entry": problem.data["entry"]})
    return question_of({"prompt": problem.prompt})


def evaluate_react(model, tokenizer, task: Task, problems: Sequence[Problem], *, options: DecodeOptions,
                   num_samples: int = 1, pass_k: Sequence[int] = (1,), tools: Sequence[str] = ("calculator",),
                   tool_format: ToolFormatName = "auto", max_turns: int = 4, max_episode_tokens: int = 512,
                   keep_samples: bool = False) -> dict[str, Any]:
    """n ReAct episodes per problem (greedy for n = 1, else sampled at options.temperature); metrics as `evaluate`.
    model: a torch causal LM (KV-cached episodes) or a generation engine such as VLLMEngine (episodes sent as
    token ids, posttrain.generation.engine_episodes)."""
    n, B = num_samples, len(problems)

    def verifier(answer: str, row: dict[str, Any]) -> float:
        return float(task.score([problems[row["problem"]]], [answer])[0])

    def make_env() -> ToolEnv:
        return ToolEnv(list(tools), format=tool_format, tokenizer=tokenizer, verifier=verifier)

    # a torch model continues its KV cache; a generation engine (vLLM, `generation_backend=vllm`) gets token ids
    sampler = (EpisodeSampler(model, tokenizer) if isinstance(model, nn.Module)
               else EngineEpisodeSampler(model, tokenizer))
    budget = EpisodeBudget(max_turns=max_turns, max_turn_tokens=options.max_new_tokens,
                           max_episode_tokens=max_episode_tokens)
    rows = [{"question": problem_question(p), "problem": b} for b, p in enumerate(problems)]
    episodes, forward, start = [], 0, time.perf_counter()
    for index, i in enumerate(range(0, B, max(1, options.batch_size))):
        params = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=0.0 if n == 1 else options.temperature,
                                seed=options.seed + index)
        out = sampler.run(make_env, rows[i:i + options.batch_size], params, n=n, budget=budget,
                          row_indices=list(range(i, min(i + options.batch_size, B))))
        episodes += out.episodes
        forward += out.forward_tokens
    wall_s = time.perf_counter() - start
    correct = [[episodes[b * n + g].verifier or 0.0 for g in range(n)] for b in range(B)]  # [B][G]
    answers = [[next((info["answer"] for info in episodes[b * n + g].infos if "answer" in info), None)
                for g in range(n)] for b in range(B)]
    answers = [[task.extract(a) if a is not None else None for a in row] for row in answers]
    acc = mean_stderr([sum(row) / n for row in correct])
    generated = sum(e.model_tokens for e in episodes)
    metrics: dict[str, Any] = {
        "strategy": "react[" + ",".join(tools) + "]", "num_problems": B, "num_samples": n,
        "accuracy": acc.mean, "accuracy_stderr": acc.stderr, "mean_generated_tokens": generated / (B * n),
        "forward_tokens": forward, "forward_per_output_token": forward / max(1, generated),
        "wall_s_per_problem": wall_s / max(1, B),
    }
    for k in sorted(set(pass_k)):
        if k <= n:
            metrics[f"pass@{k}"] = float(pass_at_k(n, [round(sum(row)) for row in correct], k).mean())
            if task.votable:
                metrics[f"maj@{k}"] = sum(majority_at_k(a, [c == 1.0 for c in row], k)
                                          for a, row in zip(answers, correct)) / B
    metrics.update(episode_metrics(episodes))
    validity = metrics.get("tool_call_validity", math.nan)
    metrics["tool_call_validity"] = validity
    out_dict: dict[str, Any] = {"metrics": metrics}
    if keep_samples:
        out_dict["problems"] = [{
            "id": p.id, "question": rows[b]["question"], "answer": p.answer,
            "episodes": [{"turns": e.turn_texts, "observations": e.observations, "reward": e.reward,
                          "finish": e.finish, "tool_calls": e.tool_calls()} for e in episodes[b * n:(b + 1) * n]],
            "answers": answers[b], "correct": correct[b]} for b, p in enumerate(problems)]
    return out_dict
