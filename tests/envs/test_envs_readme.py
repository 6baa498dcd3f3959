"""The README's tool-use example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_environment_and_tool_example_runs():
    section = README.read_text().split("## Tool use and multi-turn environments", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- the README example is trusted text
    env = namespace["GuessEnv"]()
    env.reset({"secret": 3})
    assert env.step("3").reward == 1.0
    tool_env = namespace["env"]  # the built-in ReAct environment with the README's tool
    system = tool_env.reset({"question": "Reverse abc.", "answer": "cba"})[0]["content"]
    assert "- reverse: reverses text, e.g. reverse[abc]" in system and "- calculator:" in system
    step = tool_env.step("Action: reverse[abc]\nObservation:")
    assert step.observation == " cba\n" and step.info["tool_call"] == "valid"
    assert tool_env.step("Final Answer: cba").reward == 1.0
