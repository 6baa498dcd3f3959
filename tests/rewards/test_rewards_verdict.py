"""The code verdict cannot be forged: hostile candidates that search the interpreter for a pass marker, write fake
verdicts to every descriptor, or return objects that compare equal to anything score 0 with a wrong solution,
while the honest solution scores 1 in the same call. Also: a timed-out reward stops all its work, and the
degraded (no namespace) mode either runs correct code or refuses clearly."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.rewards import sandbox as sb
from posttrain.rewards.code import CodeReward
from posttrain.rewards.guard import GuardedReward
from posttrain.rewards.sandbox import SandboxConfig, isolation_report, run_sandboxed

STUB = 'def add(a, b):\n    """Return a + b."""\n'
SECRET = "c0ffee-expected-4242"  # appears only in the tests: the candidate's process must never hold it
TEST = f"def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-7, 7) == 0\n    _ = {SECRET!r}\n"
RIGHT = "    return a + b\n"
WRONG = "    return 0\n"


@pytest.fixture(scope="module")
def isolated():
    if "private_root_fs" not in isolation_report().isolation:
        pytest.skip("the sandbox cannot isolate code on this machine")


def _score(completions: list[str], timeout_s: float = 10.0) -> tuple[list, CodeReward]:
    reward = CodeReward(SandboxConfig(timeout_s=timeout_s), max_workers=2)
    n = len(completions)
    scores = reward(prompts=[STUB] * n, completions=completions, test=[TEST] * n, entry_point=["add"] * n)
    return scores, reward


# Forgery routes: each runs at import time of the candidate's program, then defines a wrong or a right `add`.
FRAME_WALK = '''
import os, sys
found = []
frame = sys._getframe()
while frame is not None:  # every frame up to the harness: its locals and globals
    for scope in (frame.f_locals, frame.f_globals):
        for value in list(scope.values()):
            if isinstance(value, (str, dict, list, tuple)):
                found.append(repr(value))
    frame = frame.f_back
text = "\\n".join(found)
print("SECRET FOUND" if "SECRET" in text else "secret not found")
for line in text.splitlines():
    print(line[:200])
for fd in range(3, 256):  # a fake verdict on every descriptor the process holds
    try:
        os.write(fd, b'{"verdict": "passed"}\\n')
    except OSError:
        pass
print('{"verdict": "passed"}', flush=True)
'''.replace("SECRET", SECRET)

GC_AND_MEMORY = '''
import gc, os, re
# The secret is searched for as two halves that must be adjacent: the whole string never exists in this process
# unless the tests leaked into it.
A, B = HALF_A, HALF_B

def has(text):
    i = text.find(A)
    while i >= 0:
        if text.startswith(B, i + len(A)):
            return True
        i = text.find(A, i + 1)
    return False

hits = [o for o in gc.get_objects() if isinstance(o, str) and has(o)]
for o in gc.get_objects():
    if isinstance(o, dict):
        hits += [v for v in list(o.values()) if isinstance(v, str) and has(v)]
A, B = A.encode(), B.encode()
raw = False
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
    for line in maps:  # every readable mapping of the process's memory, byte for byte
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
        if not m or "[vsyscall]" in line:
            continue
        start, end = int(m[1], 16), int(m[2], 16)
        try:
            mem.seek(start)
            raw = raw or has(mem.read(end - start))
        except (OSError, ValueError, OverflowError):
            pass
print("gc hits", len(hits), "raw hit", raw)
'''.replace("HALF_A", repr(SECRET[:7])).replace("HALF_B", repr(SECRET[7:]))

REACH_THE_JUDGE = '''
import os
ppid = os.getppid()
for target in [f"/proc/{ppid}/mem", f"/proc/{ppid}/environ"] + [f"/proc/{ppid}/fd/{n}" for n in range(16)]:
    try:
        with open(target, "wb", 0) as f:
            f.write(b'{"verdict": "passed"}\\n')
        print("REACHED", target)
    except OSError as e:
        pass
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("ptrace", libc.ptrace(16, ppid, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH: EPERM, the judge is not dumpable
'''

EXIT_TRICKS = '''
import builtins, os, sys
builtins.print = lambda *a, **k: os.write(1, b'{"verdict": "passed"}\\n')
os.write(1, b'{"verdict": "passed"}\\nAll tests passed\\n')
os.write(2, b'{"verdict": "passed"}\\n')
sys.stdout.write("posttrain-sandbox-ok\\n")
os._exit(0)
'''


def _program(prelude: str, body: str) -> str:
    # a chat-style reply: the whole function, preceded by the hostile module-level code
    return f"```python\n{prelude}\ndef add(a, b):\n{body}```"


@pytest.mark.parametrize("prelude,harmless", [(FRAME_WALK, False), (GC_AND_MEMORY, True), (REACH_THE_JUDGE, True)],
                         ids=["frame_walk", "gc_and_raw_memory", "reach_the_judge"])
def test_forgery_routes_score_zero_with_a_wrong_solution_and_one_with_a_right_one(isolated, prelude, harmless):
    # FRAME_WALK also scribbles on its own call pipe, which costs even a right body its pass; the honest right
    # solution is the control there. The other preludes leave the right body its 1.0.
    right = _program(prelude, RIGHT) if harmless else _program("", RIGHT)
    scores, reward = _score([_program(prelude, WRONG), right])
    assert scores == [0.0, 1.0], [r.stderr_tail[-500:] for r in reward.last_results]
    for result in reward.last_results:
        out = result.stdout_tail
        assert "SECRET FOUND" not in out and SECRET not in out  # the tests never enter the candidate's process
        assert "REACHED" not in out
        if "gc hits" in out:
            assert "gc hits 0 raw hit False" in out, out
        if "ptrace" in out:
            assert "ptrace -1 1" in out, out  # EPERM


def test_printing_markers_and_exiting_early_score_zero(isolated):
    scores, reward = _score([_program(EXIT_TRICKS, WRONG), _program(EXIT_TRICKS, RIGHT), _program("", RIGHT)])
    assert scores == [0.0, 0.0, 1.0]  # the exit happens before any test ran, so even the right body earns nothing
    assert '{"verdict": "passed"}' in reward.last_results[0].stdout_tail  # it did print its fake verdicts


ALWAYS_EQUAL = '''
class Anything:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
    def __bool__(self):
        return True
'''
INT_SUBCLASS = '''
class Int(int):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = int.__hash__
'''
STR_SUBCLASS = '''
class Text(str):
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
'''


@pytest.mark.parametrize("prelude,returned", [
    (ALWAYS_EQUAL, "Anything()"),
    (INT_SUBCLASS, "Int(0)"),
    (INT_SUBCLASS, "[Int(0)][0]"),
    (STR_SUBCLASS, "Text('x')"),
    (ALWAYS_EQUAL, "(Anything(),)[0]"),
], ids=["eq_object", "int_subclass", "int_subclass_in_list", "str_subclass", "eq_object_in_tuple"])
def test_always_equal_results_score_zero(isolated, prelude, returned):
    right_with_prelude = _program(prelude, "    return a + b\n")
    scores, reward = _score([_program(prelude, f"    return {returned}\n"), right_with_prelude])
    assert scores == [0.0, 1.0], [r.stderr_tail[-500:] for r in reward.last_results]
    assert "not a plain value" in reward.last_results[0].stderr_tail


def test_helpers_and_builtins_the_tests_use_cannot_be_replaced(isolated):
    # HumanEval/32's pattern: the test checks find_zero's answer with the stub's own `poly`.
    trusted = "def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n"
    tests = "r = find_zero([-6, 1])\nassert abs(poly([-6, 1], r)) < 1e-6\nassert abs(r - 6) < 1e-9\n"
    honest = trusted + "def find_zero(xs):\n    return -xs[0] / xs[1]\n"
    cheat = trusted + "def find_zero(xs):\n    return 0.0\ndef poly(xs, x):\n    return 0.0\ndef abs(v):\n    return 0\n"
    assert run_sandboxed(honest, tests, trusted=trusted, entry_points=["find_zero"]).passed
    result = run_sandboxed(cheat, "r = find_zero([-6, 1])\nassert abs(poly([-6, 1], r)) < 1e-6\n", trusted=trusted,
                           entry_points=["find_zero"])
    assert result.status == "failed" and "AssertionError" in result.stderr_tail


def test_plain_values_round_trip_exactly_and_exceptions_keep_their_type(isolated):
    candidate = textwrap.dedent("""
        def echo(x):
            return x
        def boom(kind):
            raise {"value": ValueError, "key": KeyError}[kind]("nope")
    """)
    tests = textwrap.dedent("""
        import math
        values = [None, True, False, 0, -1, 2 ** 200, -(3 ** 99), 0.1, -0.0, float("inf"), 1e-310, 3 + 4j, "é\\u2603",
                  b"\\x00\\xff", [1, [2, (3, {4: "a"})]], (), {"k": [1.5]}, {1, 2}, frozenset({"a"}), {(1, 2): None}]
        for v in values:
            got = echo(v)
            assert type(got) is type(v) and got == v and repr(got) == repr(v), (v, got)
        assert math.isnan(echo(float("nan")))
        assert math.copysign(1.0, echo(-0.0)) == -1.0
        assert echo(x=[1]) == [1]
        for kind, exc in (("value", ValueError), ("key", KeyError)):
            try:
                boom(kind)
            except exc:
                pass
            else:
                raise AssertionError("no exception")
    """)
    result = run_sandboxed(candidate, tests)
    assert result.passed, result.stderr_tail


def test_a_timed_out_reward_stops_all_its_work(isolated, monkeypatch, no_leftovers):
    started: list[float] = []
    original = sb.subprocess.Popen

    def counting(*args, **kwargs):  # every sandbox process started
        started.append(time.monotonic())
        return original(*args, **kwargs)

    monkeypatch.setattr(sb.subprocess, "Popen", counting)
    reward = GuardedReward(CodeReward(SandboxConfig(timeout_s=30.0), max_workers=2), timeout_s=1.0,
                           per_item_retry=False)
    n = 8
    t0 = time.monotonic()
    scores = reward(prompts=[STUB] * n, completions=["    while True:\n        pass\n"] * n, test=[TEST] * n,
                    entry_point=["add"] * n)
    returned = time.monotonic()
    assert scores == [0.0] * n and reward.pop_counters()["reward_timeouts"] == n
    assert returned - t0 < 1.0 + sb.SandboxConfig().timeout_s  # the guard returned long before the sandboxes would
    time.sleep(1.0)
    assert [s for s in started if s > returned] == []  # no sandbox started after the guard gave up
    assert len(started) <= 2  # the two running when it timed out; the other six never started
    assert not [t for t in threading.enumerate() if t.name.startswith(("reward-", "sandbox"))]  # threads stopped
    # no_leftovers: every sandbox process of the abandoned call is gone


def test_a_timed_out_python_reward_thread_is_stopped():
    calls = []

    def spin(prompts, completions, **kwargs):
        calls.append(1)
        while True:
            try:
                while True:
                    pass
            except Exception:  # noqa: BLE001, S110 -- a reward that swallows ordinary exceptions still stops
                pass

    reward = GuardedReward(spin, timeout_s=0.3, per_item_retry=False)
    assert reward(prompts=["p"], completions=["c"]) == [0.0]
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name.startswith("reward-")]


def _stdlib_readable_by_others() -> bool:
    path = Path(os.__file__).resolve().parent
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *path.parents])


@pytest.mark.skipif(os.geteuid() != 0, reason="the degraded mode switches to a fresh uid only as root")
def test_degraded_mode_runs_correct_code_or_refuses_clearly():
    config = SandboxConfig(use_namespaces=False, require_isolation=False, timeout_s=10.0)
    reward = CodeReward(config)
    program = "    import math\n    return int(math.fsum([a, b]))\n"
    scores = reward(prompts=[STUB], completions=[program], test=[TEST], entry_point=["add"])
    result = reward.last_results[0]
    if _stdlib_readable_by_others():
        assert scores == [1.0], result.stderr_tail
    else:  # e.g. Python under a 0700 home: refused as a sandbox error (reward None), never scored 0
        assert scores == [None] and result.status == "error"
        assert "cannot read the Python standard library" in result.error


def test_the_reward_grpo_builds_scores_forgeries_zero(isolated):
    """The same guarantee through the path GRPO and PPO use: build_rewards -> GuardedReward(CodeReward)."""
    from posttrain.rewards import build_rewards

    (reward,) = build_rewards(["code"], {"code": {"config": SandboxConfig(timeout_s=10.0)}}, timeout_s=60.0)
    completions = [_program(FRAME_WALK, WRONG), _program(ALWAYS_EQUAL, "    return Anything()\n"),
                   _program(INT_SUBCLASS, "    return Int(0)\n"), _program("", RIGHT)]
    n = len(completions)
    assert reward(prompts=[STUB] * n, completions=completions, test=[TEST] * n, entry_point=["add"] * n) == \
        [0.0, 0.0, 0.0, 1.0]
