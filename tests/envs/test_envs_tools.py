"""Tools and tool-call formats: hand-worked calculator values, BM25 search against the formula, the Python executor's
sandbox limits (a hostile call cannot write outside its folder or hang), ReAct and chat-template parsing."""

import math
import os
import time

import pytest

from posttrain.envs import (
    ChatToolFormat,
    ReActFormat,
    Tool,
    ToolEnv,
    ToolError,
    calculate,
    call_tool,
    supports_tool_calls,
    tool_format,
)
from posttrain.envs.tools import Corpus, calculator_tool, python_tool, search_tool
from posttrain.generation.episodes import EpisodeSampler
from posttrain.models import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("expr, value", [
    ("12 * 34", "408"), ("361*220", "79420"), ("2**10", "1024"), ("7 / 2", "3.5"), ("-(3 - 10) % 4", "3"),
    ("1/3", "0.333333333333"), ("123456789 * 987654321", "121932631112635269"), ("6 / 3", "2"), ("2 ^ 3", "8"),
    ("  `4 × 5` = ", "20"),
])
def test_calculator_hand_worked(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr, message", [
    ("1/0", "division by zero"), ("__import__('os').system('x')", "unsupported element Call"),
    ("9**9**9", "power too large"), ("x + 1", "unsupported element Name"), ("2 +", "cannot parse"),
    ("", "empty expression"), ("1" * 300, "longer than 200"),
])
def test_calculator_rejects_with_a_message(expr, message):
    with pytest.raises(ToolError, match=message):
        calculate(expr)


def test_call_tool_turns_every_failure_into_an_error_observation():
    tools = {"calculator": calculator_tool(),
             "crash": Tool("crash", "raises", lambda a: 1 / 0),
             "slow": Tool("slow", "sleeps", lambda a: time.sleep(30) or "late", timeout_s=0.3)}
    assert call_tool(tools, "calculator", "2*21").text == "42"
    bad = call_tool(tools, "calculator", "2*")
    assert not bad.ok and bad.text.startswith("Error: cannot parse")
    assert call_tool(tools, "crash", "").text == "Error: ZeroDivisionError: division by zero"
    t0 = time.perf_counter()
    slow = call_tool(tools, "slow", "")
    assert not slow.ok and "no result within 0.3 s" in slow.text and time.perf_counter() - t0 < 5
    unknown = call_tool(tools, "hammer", "x")
    assert not unknown.ok and unknown.text == "Error: unknown tool 'hammer'. Available tools: calculator, crash, slow."
    long = call_tool({"echo": Tool("echo", "", lambda a: a)}, "echo", "z" * 1000, max_chars=10)
    assert long.text == "z" * 10 + " ...[cut]"


def test_bm25_search_matches_the_formula():
    docs = ({"title": "A", "text": "cat cat dog"}, {"title": "B", "text": "dog bird"})
    corpus = Corpus(docs)
    # document A has 4 tokens ("a cat cat dog"), B 3 ("b dog bird"); avg 3.5; "cat" in 1 of 2 docs
    idf = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 4 / 3.5))
    (score, doc), = corpus.search("cat", k=5)
    assert doc["title"] == "A" and score == pytest.approx(expected, rel=1e-12)
    tool = search_tool()
    assert tool.fn("speed of light").startswith("Speed of light: The speed of light in vacuum is exactly 299792458")
    assert "Front Row" in tool.fn("Apple Remote")
    with pytest.raises(ToolError, match="nothing found"):
        tool.fn("zzzz qqqq")


def test_python_tool_runs_in_the_sandbox_and_hostile_calls_fail(tmp_path):
    tool = python_tool(timeout_s=2.0)
    assert tool.fn("print(sum(range(101)))") == "5050"
    assert tool.fn("```python\nprint(6*7)\n```") == "42"
    target = tmp_path / "escaped.txt"
    out = call_tool({"python": tool}, "python", f"open({str(target)!r}, 'w').write('owned')\nprint('wrote')")
    assert not out.ok and not target.exists()  # the host folder is not visible inside the sandbox
    out = call_tool({"python": tool}, "python", "import os\nos.system('touch /tmp/posttrain_escape_test')")
    assert not os.path.exists("/tmp/posttrain_escape_test")
    t0 = time.perf_counter()
    out = call_tool({"python": tool}, "python", "while True:\n    pass")
    assert not out.ok and "ran past the 2 s limit" in out.text
    assert time.perf_counter() - t0 < 8  # the sandbox kills it; the trainer does not hang
    out = call_tool({"python": tool}, "python", "raise ValueError('bad input')")
    assert out.text == "Error: the program failed: ValueError: bad input"


@pytest.mark.parametrize("text, kind, name, argument, answer", [
    ("Thought: multiply.\nAction: calculator[12 * 34]\nObservation:", "call", "calculator", "12 * 34", ""),
    ("Action 2: search[Front Row (software)]", "call", "search", "Front Row (software)", ""),
    ("Action: python[print([1, 2][0])]\nObservation:", "call", "python", "print([1, 2][0])", ""),
    ("Thought: done.\nFinal Answer: 408", "answer", "", "", "408"),
    ("Action: finish[keyboard function keys]", "answer", "", "", "keyboard function keys"),
    ("Action: calculator[2*3]\nObservation: 6\nFinal Answer: 6\nmore", "answer", "", "", "6"),
    ("Action: calculate 2*3", "malformed", "", "", ""),
    ("The answer is 6.", "none", "", "", ""),
])
def test_react_parse(text, kind, name, argument, answer):
    parsed = ReActFormat().parse(text)
    assert (parsed.kind, parsed.name, parsed.argument, parsed.answer) == (kind, name, argument, answer)


def test_chat_tool_call_parse():
    tools = {"calculator": calculator_tool()}
    f = ChatToolFormat()
    p = f.parse('<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*4"}}\n</tool_call>', tools)
    assert (p.kind, p.name, p.argument) == ("call", "calculator", "3*4")
    p = f.parse('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"5\\"}"}</tool_call>', tools)
    assert (p.kind, p.argument) == ("call", "5")
    assert f.parse("<tool_call>{not json}</tool_call>", tools).kind == "malformed"
    assert f.parse('<tool_call>{"arguments": {}}</tool_call>', tools).kind == "malformed"
    assert f.parse("It is 12.", tools) == f.parse("It is 12.", tools)
    assert f.parse("Final Answer: 12", tools).answer == "12"


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_with_tools_gets_tool_calls_and_tool_messages():
    tok = tiny_tokenizer()
    assert not supports_tool_calls(tok) and isinstance(tool_format("auto", tok), ReActFormat)
    tok.chat_template = TOOLS_TEMPLATE
    assert supports_tool_calls(tok)
    env = ToolEnv(["calculator"], format="auto", tokenizer=tok)
    assert isinstance(env.format, ChatToolFormat)
    sampler = EpisodeSampler(tiny_model(), tok)
    prompt = tok.decode(sampler.prompt_ids(env.reset({"question": "12*34?", "answer": "408"}), env))
    assert prompt.startswith("<|im_start|>system\nTools: calculator <|im_end|>\n")
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>')
    assert step.observation == [{"role": "tool", "content": "408"}] and step.info["tool_call"] == "valid"
    ids = sampler.observation_ids(step.observation, closed=True, env=env)
    assert tok.decode(ids) == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    final = env.step("Final Answer: 408")
    assert final.done and final.reward == 1.0
