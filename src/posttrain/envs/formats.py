"""How a model calls tools in text: the ReAct `Thought / Action / Observation` format, or chat-template tool calls.

ReAct (Yao et al. 2023, "ReAct: Synergizing Reasoning and Acting in Language Models", arXiv 2210.03629) needs no
special tokens: the model writes `Thought: ...`, then `Action: tool[argument]`; generation stops at `Observation:`,
the controller runs the tool and appends the result, and the model goes on. The episode ends with
`Final Answer: <answer>` (or the paper's `Action: finish[<answer>]`).

Chat-template tool calls (the Hermes / Qwen convention, used when the model's chat template renders `tools`): the
model writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and ends its message; the result comes back
as a message with role `tool`, rendered by the template. A message without a tool call is the final answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from posttrain.envs.tools import Tool

ParsedKind = Literal["call", "answer", "malformed", "none"]


@dataclass(frozen=True)
class Parsed:
    """One model turn, parsed. kind: "call" (name, argument), "answer" (answer), "malformed" (error says why) or
    "none" (neither a call nor an answer)."""

    kind: ParsedKind
    name: str = ""
    argument: str = ""
    answer: str = ""
    error: str = ""


_ACTION = re.compile(r"Action(?:\s*\d+)?\s*:", re.IGNORECASE)
_FINAL = re.compile(r"Final Answer\s*:", re.IGNORECASE)
_CALL = re.compile(r"\s*`?([A-Za-z_][\w\-]*)\s*\[(.*)\]", re.DOTALL)


class ReActFormat:
    """Thought / Action: tool[argument] / Observation: result ... Final Answer: answer."""

    name = "react"
    stop: tuple[str, ...] = ("Observation:",)

    def instructions(self, tools: dict[str, Tool], example: str | None = None) -> str:
        """The system prompt: the tools, the format, and an optional worked example."""
        lines = ["Answer the question. You can use tools. Use this format:",
                 "Thought: what to do next",
                 "Action: tool_name[input]",
                 "Observation: the tool's result",
                 "... (Thought / Action / Observation can repeat)",
                 "Final Answer: the answer",
                 "", "Tools:"]
        lines += [f"- {t.name}: {t.description}" for t in tools.values()]
        if example:
            lines += ["", "Example:", example]
        return "\n".join(lines)

    def parse(self, text: str) -> Parsed:
        """The last Action or Final Answer in `text` (whichever comes later); `finish[x]` is a final answer."""
        action = list(_ACTION.finditer(text))
        final = list(_FINAL.finditer(text))
        a = action[-1].end() if action else -1
        f = final[-1].end() if final else -1
        if f > a:
            answer = text[f:].split("Observation:")[0].strip().splitlines()
            return Parsed("answer", answer=answer[0].strip() if answer else "") if answer else \
                Parsed("malformed", error="'Final Answer:' is empty")
        if a < 0:
            return Parsed("none", error="no 'Action: tool[input]' and no 'Final Answer:' found")
        rest = text[a:]
        cut = rest.rfind("Observation:")
        rest = rest[:cut] if cut >= 0 else rest
        match = _CALL.match(rest)
        if match is None:
            return Parsed("malformed", error="the action must read 'Action: tool_name[input]'")
        name, argument = match.group(1), match.group(2).strip()
        if name.lower() == "finish":
            return Parsed("answer", answer=argument)
        return Parsed("call", name=name, argument=argument)

    def observation(self, turn_text: str, result: str) -> str:
        """The text appended after the model's turn: the result after its own `Observation:` if it wrote one."""
        if turn_text.rstrip().endswith("Observation:"):
            return f" {result}\n"
        return f"\nObservation: {result}\n"


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class ChatToolFormat:
    """Chat-template tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, results as `tool` messages."""

    name = "chat"
    stop: tuple[str, ...] = ()

    def instructions(self, tools: dict[str, Tool], example: str | None = None) -> str:
        text = ("Answer the question. To use a tool, reply with <tool_call>{\"name\": ..., \"arguments\": {...}}"
                "</tool_call>; its result comes back as a tool message. When you know the answer, reply "
                "'Final Answer: <answer>'.")
        return text + (f"\n\nExample:\n{example}" if example else "")

    def parse(self, text: str, tools: dict[str, Tool] | None = None) -> Parsed:
        """The first `<tool_call>` block, else a final answer (the text after 'Final Answer:', or the whole text)."""
        match = _TOOL_CALL.search(text)
        if match is None:
            final = list(_FINAL.finditer(text))
            answer = text[final[-1].end():] if final else text
            return Parsed("answer", answer=answer.strip())
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError as e:
            return Parsed("malformed", error=f"the tool call is not valid JSON ({e.msg})")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Parsed("malformed", error='a tool call needs {"name": "...", "arguments": {...}}')
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if isinstance(args, dict):
            tool = (tools or {}).get(call["name"])
            if tool is not None and tool.parameter in args:
                value = args[tool.parameter]
            elif len(args) == 1:
                value = next(iter(args.values()))
            else:
                return Parsed("malformed", error=f"tool '{call['name']}' takes one argument")
        else:
            value = args
        return Parsed("call", name=call["name"], argument=str(value))

    def observation(self, turn_text: str, result: str) -> list[dict[str, str]]:
        return [{"role": "tool", "content": result}]


ToolFormatName = Literal["auto", "react", "chat"]


def supports_tool_calls(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a `tools` list (and so knows a tool-call convention)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return isinstance(template, str) and "tools" in template


def tool_format(name: ToolFormatName, tokenizer=None) -> ReActFormat | ChatToolFormat:
    """'react', 'chat', or 'auto': chat-template tool calls when the template supports them, else ReAct."""
    if name == "react":
        return ReActFormat()
    if name == "chat":
        return ChatToolFormat()
    if name == "auto":
        return ChatToolFormat() if tokenizer is not None and supports_tool_calls(tokenizer) else ReActFormat()
    raise ValueError(f"unknown tool format {name!r}; expected auto, react or chat")
