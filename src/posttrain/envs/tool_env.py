"""A question-answering environment with tools: the model may call tools for several turns, then gives a final answer.

The episode's reward is the verifier's score of the final answer (1 or 0) plus optional per-turn rewards for each
valid and each failed tool call. A malformed call, an unknown tool or a failing tool gives an error observation and
the episode goes on (the engine's turn and token budgets end it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from posttrain.envs.base import Messages, StepResult
from posttrain.envs.formats import (
    ChatToolFormat,
    ReActFormat,
    ToolFormatName,
    tool_format,
)
from posttrain.envs.tools import Tool, build_tools, call_tool

REACT_EXAMPLE = """Question: What is 12 * 34?
Thought: I multiply with the calculator.
Action: calculator[12 * 34]
Observation: 408
Thought: I have the result.
Final Answer: 408"""

Verifier = Callable[[str, dict[str, Any]], float]


def verify_answer(answer: str, row: dict[str, Any]) -> float:
    """1.0 when `answer` is right for `row`: reasoning-gym rows (an `entry` column) by the task's own scorer on the
    answer's last number (or the whole answer), other rows by math-verify / exact match against the `answer` column."""
    from posttrain.rewards.text import last_number

    if "entry" in row:
        from posttrain.rewards.gym import gym_score

        candidate = last_number(answer) or answer.strip()
        return float(gym_score(candidate, row["entry"], row.get("task"), row.get("task_config")) == 1.0)
    from posttrain.rewards.math import math_equal, parse_math

    gold = str(row["answer"])
    if parse_math(gold) and parse_math(answer):
        return float(math_equal(gold, answer))
    return float(answer.strip().casefold() == gold.strip().casefold())


def question_of(row: dict[str, Any]) -> str:
    """The question of a row: `question`, the question of a reasoning-gym `entry`, or the (last user turn of) `prompt`."""
    if isinstance(row.get("question"), str):
        return row["question"]
    if "entry" in row:
        entry = json.loads(row["entry"]) if isinstance(row["entry"], str) else row["entry"]
        return str(entry["question"])
    prompt = row["prompt"]
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("the prompt has no user message")
        return users[-1]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"'prompt' must be a non-empty string or chat messages, got {type(prompt).__name__}")
    return prompt


class ToolEnv:
    """Answer a row's question with tools. tools: names from envs.tools.TOOLS (or Tool objects); format: "react",
    "chat" or "auto" (chat-template tool calls when `tokenizer`'s template supports them); verifier(answer, row):
    default `verify_answer`; valid_call_reward / failed_call_reward: per-turn rewards for a tool call that ran / that
    was malformed, unknown or failed; example: a worked example for the system prompt (None: none)."""

    name = "tools"

    def __init__(self, tools: list[str | Tool] | tuple[str | Tool, ...] = ("calculator",), *,
                 format: ToolFormatName = "react", tokenizer=None, verifier: Verifier | None = None,
                 valid_call_reward: float = 0.0, failed_call_reward: float = 0.0, example: str | None = REACT_EXAMPLE,
                 max_observation_chars: int = 400):
        named = [t for t in tools if isinstance(t, str)]
        self.tools: dict[str, Tool] = {**build_tools(named), **{t.name: t for t in tools if isinstance(t, Tool)}}
        self.format: ReActFormat | ChatToolFormat = tool_format(format, tokenizer)
        self.verifier = verifier or verify_answer
        self.valid_call_reward, self.failed_call_reward = valid_call_reward, failed_call_reward
        self.example = example if isinstance(self.format, ReActFormat) else None
        self.max_observation_chars = max_observation_chars
        self.chat_tools = [t.schema() for t in self.tools.values()] if isinstance(self.format, ChatToolFormat) else None
        self.stop = self.format.stop
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> Messages:
        """System prompt (tools, format, example) and the row's question; raises if the row cannot be verified."""
        if self.verifier is verify_answer and "entry" not in row and "answer" not in row:
            raise ValueError("the row has neither an 'answer' nor a reasoning-gym 'entry' column to verify against")
        self.row = row
        return [{"role": "system", "content": self.format.instructions(self.tools, self.example)},
                {"role": "user", "content": question_of(row)}]

    def step(self, text: str) -> StepResult:
        """A final answer ends the episode with the verifier's score; a tool call gives the tool's observation."""
        parsed = (self.format.parse(text, self.tools) if isinstance(self.format, ChatToolFormat)
                  else self.format.parse(text))
        if parsed.kind == "answer":
            score = float(self.verifier(parsed.answer, self.row))
            return StepResult(None, score, True, {"verifier": score, "answer": parsed.answer})
        if parsed.kind == "call":
            outcome = call_tool(self.tools, parsed.name, parsed.argument, max_chars=self.max_observation_chars)
            status = "valid" if outcome.ok else ("unknown_tool" if parsed.name not in self.tools else "failed")
            reward = self.valid_call_reward if outcome.ok else self.failed_call_reward
            return StepResult(self.format.observation(text, outcome.text), reward, False,
                              {"tool_call": status, "tool": parsed.name})
        message = f"Error: {parsed.error}. Write 'Action: tool_name[input]' or 'Final Answer: <answer>'."
        if isinstance(self.format, ChatToolFormat):
            message = f"Error: {parsed.error}."
        info = {"tool_call": "malformed"} if parsed.kind == "malformed" else {"no_action": 1}
        return StepResult(self.format.observation(text, message), self.failed_call_reward, False, info)
