"""Tools an environment offers the model: a calculator, a Python executor in the sandbox, a search over a local corpus.

A `Tool` is a name, a one-line description (shown to the model), and a function from the call's argument text to the
observation text. A tool signals a bad call by raising `ToolError` (its message becomes the error observation the
model sees); any other exception is also turned into an error observation by `call_tool`, so a malformed or failing
call never crashes an episode. `call_tool` also enforces a wall-time limit: a tool that does not answer in time gives
an error observation (the Python executor's own limits come from the sandbox, which kills its processes).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from posttrain.envs.base import CallTimeout, call_with_timeout


class ToolError(Exception):
    """A tool call the tool cannot serve (bad arguments, a failing program); the message is shown to the model."""


@dataclass(frozen=True)
class Tool:
    """name: what the model writes in a call; description: one line for the prompt; fn(argument text) -> observation.

    parameter: the name of the single string argument in the JSON schema given to chat templates with tool support
    (e.g. {"name": "calculator", "arguments": {"expression": "2*3"}}).
    """

    name: str
    description: str
    fn: Callable[[str], str]
    parameter: str = "input"
    timeout_s: float = 10.0

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema that `apply_chat_template(tools=...)` takes."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": {self.parameter: {"type": "string"}},
                           "required": [self.parameter]}}}


@dataclass(frozen=True)
class ToolOutcome:
    """What one call gave: the observation text, and whether it succeeded (ok) or is an error observation."""

    text: str
    ok: bool


def call_tool(tools: dict[str, Tool], name: str, argument: str, *, max_chars: int = 400) -> ToolOutcome:
    """Run tool `name` on `argument`; unknown tools, ToolError, other exceptions and timeouts give error observations.

    The observation is cut to `max_chars` characters (a long output would blow the episode's token budget).
    """
    tool = tools.get(name)
    if tool is None:
        return ToolOutcome(f"Error: unknown tool '{name}'. Available tools: {', '.join(sorted(tools))}.", False)
    try:
        text = str(call_with_timeout(lambda: tool.fn(argument), tool.timeout_s, f"tool-{name}"))
    except CallTimeout:  # the thread is abandoned; the sandboxed tools kill their own processes
        return ToolOutcome(f"Error: tool '{name}' gave no result within {tool.timeout_s:g} s.", False)
    except ToolError as e:
        return ToolOutcome(_cut(f"Error: {e}", max_chars), False)
    except Exception as e:  # noqa: BLE001 -- a tool bug becomes an error observation, not a crash
        return ToolOutcome(_cut(f"Error: {type(e).__name__}: {e}", max_chars), False)
    return ToolOutcome(_cut(text, max_chars), True)


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + " ...[cut]"


# ---- calculator -----------------------------------------------------------------------------------------------------

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPRESSION_CHARS = 200
_MAX_MAGNITUDE = 10 ** 100


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) without `eval`.

    Integers stay exact; a non-integer result is printed with up to 12 significant digits. Anything else (names,
    calls, huge powers, division by zero) raises ToolError with a message for the model.
    """
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").strip(" \t\n`=")
    if not text:
        raise ToolError("empty expression; write e.g. calculator[12 * 34]")
    if len(text) > _MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {text!r} as arithmetic; use numbers and + - * / ( )") from None
    value = _eval(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("the result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value  # type: ignore[return-value]  # int or float, checked above
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10 ** 6):
            raise ToolError("power too large (exponent at most 64, base at most 10^6)")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex) or abs(value) > _MAX_MAGNITUDE:
            raise ToolError("the result is out of range")
        return value
    raise ToolError(f"unsupported element {type(node).__name__!s} in the expression; only arithmetic is allowed")


def calculator_tool() -> Tool:
    """The calculator: exact integer arithmetic on one expression."""
    return Tool("calculator", "evaluates an arithmetic expression, e.g. calculator[123 * 456]", calculate,
                parameter="expression", timeout_s=2.0)


# ---- Python in the sandbox ------------------------------------------------------------------------------------------

def _program_error(stderr: str) -> str:
    """The last line of the program's own traceback (the sandbox's judge adds one of its own after a program that
    exits early; that one is not the program's error)."""
    chunks = stderr.split("Traceback (most recent call last):")
    own = [c for c in chunks if "<candidate>" in c] or chunks
    lines = [line for line in own[-1].strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def python_tool(timeout_s: float = 5.0, memory_mb: int = 256) -> Tool:
    """Runs the argument as a Python program in posttrain.rewards.sandbox (its file system, network, process and time
    limits) and returns what it printed; a non-zero exit, a timeout or a memory overrun is an error observation."""
    from posttrain.rewards.sandbox import SandboxConfig, run_sandboxed

    config = SandboxConfig(timeout_s=timeout_s, memory_mb=memory_mb, max_procs=4, max_file_mb=1, workdir_mb=8,
                           max_output_bytes=64_000)

    def run(code: str) -> str:
        code = _strip_fence(code)
        if not code.strip():
            raise ToolError("empty program; write e.g. python[print(2 + 3)]")
        result = run_sandboxed(code, "", config)
        out = result.stdout_tail.strip()
        if result.status == "passed":
            return out or "(no output; use print)"
        if result.status == "timeout":
            raise ToolError(f"the program ran past the {timeout_s:g} s limit and was stopped")
        if result.status == "error":
            raise ToolError(f"the sandbox could not run the program ({result.error})")
        raise ToolError(f"the program failed: {_program_error(result.stderr_tail) or result.status}")

    return Tool("python", "runs a Python program and returns what it prints, e.g. python[print(2**10)]", run,
                parameter="code", timeout_s=timeout_s + 10.0)


def _strip_fence(code: str) -> str:
    match = re.fullmatch(r"\s*```(?:python)?\s*\n(.*?)\n?```\s*", code, flags=re.DOTALL)
    return match.group(1) if match else code


# ---- search over a local corpus -------------------------------------------------------------------------------------

CORPUS_PATH = Path(__file__).with_name("data") / "corpus.jsonl"
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Corpus:
    """Documents {title, text} with a BM25 index (Robertson & Zaragoza 2009, k1 = 1.5, b = 0.75)."""

    docs: tuple[dict[str, str], ...]
    k1: float = 1.5
    b: float = 0.75
    _tokens: tuple[tuple[str, ...], ...] = field(default=(), repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_tokens", tuple(tuple(_WORD.findall((d["title"] + " " + d["text"]).lower()))
                                                  for d in self.docs))

    def search(self, query: str, k: int = 1) -> list[tuple[float, dict[str, str]]]:
        """The k best documents for `query` by BM25 score (ties: corpus order); documents scoring 0 are left out."""
        terms = _WORD.findall(query.lower())
        N = len(self.docs)
        avg = sum(len(t) for t in self._tokens) / max(N, 1)
        scores = []
        for i, toks in enumerate(self._tokens):
            score = 0.0
            for term in set(terms):
                df = sum(term in t for t in self._tokens)
                tf = toks.count(term)
                if tf == 0:
                    continue
                idf = math.log(1 + (N - df + 0.5) / (df + 0.5))
                score += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * len(toks) / avg))
            scores.append((score, -i))
        best = sorted(((s, -j) for s, j in scores if s > 0), key=lambda x: (-x[0], x[1]))[:k]
        return [(s, self.docs[i]) for s, i in best]


@lru_cache(maxsize=4)
def load_corpus(path: str = str(CORPUS_PATH)) -> Corpus:
    """The documents of a JSONL file with `title` and `text` (default: the small corpus shipped in envs/data)."""
    docs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("title"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}, line {n}: each document needs string fields 'title' and 'text'")
            docs.append({"title": row["title"], "text": row["text"]})
    return Corpus(tuple(docs))


def search_tool(corpus_path: str | None = None, k: int = 1) -> Tool:
    """Search[query] over a local corpus (no network): the best document's title and text, like ReAct's Search."""
    corpus = load_corpus(corpus_path or str(CORPUS_PATH))

    def run(query: str) -> str:
        if not query.strip():
            raise ToolError("empty query; write e.g. search[speed of light]")
        hits = corpus.search(query, k)
        if not hits:
            raise ToolError(f"nothing found for {query.strip()!r}")
        return " | ".join(f"{doc['title']}: {doc['text']}" for _, doc in hits)

    return Tool("search", "looks a topic up in a small encyclopedia, e.g. search[speed of light]", run,
                parameter="query", timeout_s=5.0)


TOOLS: dict[str, Callable[..., Tool]] = {"calculator": calculator_tool, "python": python_tool, "search": search_tool}


def build_tools(names: list[str] | tuple[str, ...]) -> dict[str, Tool]:
    """Tools by name (TOOLS); an unknown name raises ValueError listing the known ones."""
    out = {}
    for name in names:
        if name not in TOOLS:
            raise ValueError(f"unknown tool {name!r}; expected one of {', '.join(sorted(TOOLS))}")
        out[name] = TOOLS[name]()
    return out
