"""Bad environments and rows: clear errors naming the environment, the row (and turn); the run never hangs."""

import time

import pytest

from posttrain.envs import EnvError, StepResult, ToolEnv, env_factory
from posttrain.errors import ConfigError
from posttrain.generation.episodes import EpisodeBudget, EpisodeSampler
from posttrain.generation.sampler import SamplingParams
from posttrain.models import tiny_model, tiny_tokenizer

PARAMS = SamplingParams(max_new_tokens=3, seed=0)
ROWS = [{"prompt": "a"}, {"prompt": "b", "bad": True}]


class Good:
    name = "good"

    def reset(self, row):
        if row.get("bad"):
            raise KeyError("needs column 'answer'")
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        return StepResult("obs", 1.0, True)


def _run(env_cls, rows=ROWS, timeout=5.0, turns=3):
    sampler = EpisodeSampler(tiny_model(), tiny_tokenizer())
    return sampler.run(env_cls, rows, PARAMS, budget=EpisodeBudget(max_turns=turns, max_turn_tokens=3,
                                                                   env_timeout_s=timeout))


def test_unusable_row_names_environment_and_row():
    with pytest.raises(EnvError, match=r"environment 'good' cannot use row 1 .*KeyError: \"needs column 'answer'\""):
        _run(Good)


class StepRaises(Good):
    name = "raiser"

    def step(self, text):
        raise RuntimeError("boom")


class WrongReset(Good):
    def reset(self, row):
        return 42


class WrongStep(Good):
    def step(self, text):
        return {"observation": "x"}


class WrongReward(Good):
    def step(self, text):
        return StepResult("x", "1.0", False)


class NaNReward(Good):
    def step(self, text):
        return StepResult("x", float("nan"), False)


class NoObservation(Good):
    def step(self, text):
        return StepResult(None, 0.0, False)


class EmptyObservation(Good):
    def step(self, text):
        return StepResult("", 0.0, False)


class BadMessages(Good):
    def step(self, text):
        return StepResult([{"role": "tool"}], 0.0, False)


@pytest.mark.parametrize("cls, pattern", [
    (StepRaises, r"environment 'raiser', row 0, turn 1: step raised RuntimeError: boom"),
    (WrongReset, r"environment 'good', row 0: reset returned int 42; expected a prompt string"),
    (WrongStep, r"row 0, turn 1: step returned dict .*expected a StepResult"),
    (WrongReward, r"row 0, turn 1: step returned reward '1.0'; expected a finite number"),
    (NaNReward, r"returned reward nan"),
    (NoObservation, r"no observation \(None\) for an episode that goes on"),
    (EmptyObservation, r"no observation \(''\) for an episode that goes on"),
    (BadMessages, r"observation: returned list .*expected a prompt string or a non-empty list of chat messages"),
])
def test_broken_environments_raise_clear_errors(cls, pattern):
    with pytest.raises(EnvError, match=pattern):
        _run(cls, rows=ROWS[:1])


class Hangs(Good):
    name = "hangs"

    def step(self, text):
        time.sleep(60)


class HangsReset(Good):
    name = "hangs_reset"

    def reset(self, row):
        while True:
            time.sleep(0.01)


def test_an_environment_that_hangs_stops_the_run_with_an_error():
    t0 = time.perf_counter()
    with pytest.raises(EnvError, match=r"environment 'hangs', row 0, turn 1: step: no answer within 0.5 s"):
        _run(Hangs, rows=ROWS[:1], timeout=0.5)
    with pytest.raises(EnvError, match=r"'hangs_reset', row 0: reset: no answer within 0.5 s"):
        _run(HangsReset, rows=ROWS[:1], timeout=0.5)
    assert time.perf_counter() - t0 < 10


class NeverDone(Good):
    def step(self, text):
        return StepResult("more", 0.5, False)


def test_an_environment_that_never_ends_is_cut_by_the_turn_budget():
    out = _run(NeverDone, rows=ROWS[:1], turns=4)
    assert out.episodes[0].finish == "max_turns" and out.episodes[0].turns == 4 and out.episodes[0].reward == 2.0


def test_environment_specs_and_options_fail_before_a_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="expected a built-in name or 'path/to/file.py:ClassName'"):
        env_factory("nope")
    with pytest.raises(ConfigError, match="cannot build it with options"):
        env_factory("tools", {"no_such_option": 1})
    with pytest.raises(ConfigError, match="unknown tool 'hammer'; expected one of calculator, python, search"):
        env_factory("tools", {"tools": ["hammer"]})
    (tmp_path / "broken.py").write_text("raise ImportError('half-written file')\n")
    with pytest.raises(ConfigError, match="importing .*broken.py' raised ImportError: half-written file"):
        env_factory(f"{tmp_path / 'broken.py'}:Env")
    (tmp_path / "ok.py").write_text(
        "from posttrain.envs import StepResult\n"
        "class Env:\n    name = 'mine'\n    def __init__(self, k=1):\n        self.k = k\n"
        "    def reset(self, row):\n        return row['prompt']\n"
        "    def step(self, text):\n        return StepResult(None, float(self.k), True)\n")
    make = env_factory(f"{tmp_path / 'ok.py'}:Env", {"k": 3})
    assert make().k == 3 and make() is not make()


def test_tool_env_rejects_rows_it_cannot_verify():
    with pytest.raises(EnvError, match=r"environment 'tools' cannot use row 0 .*neither an 'answer' nor"):
        _run(ToolEnv, rows=[{"prompt": "what is 2+2?"}])


class WrongInfo(Good):
    def step(self, text):
        return StepResult("x", 0.0, False, info=["valid"])


class WrongDone(Good):
    def step(self, text):
        return StepResult("x", 0.0, 1)


@pytest.mark.parametrize("cls, pattern", [
    (WrongInfo, r"environment 'good', row 0, turn 1: step returned info list \['valid'\]; expected a dict"),
    (WrongDone, r"environment 'good', row 0, turn 1: step returned done=1; expected True or False"),
])
def test_wrong_info_and_done_types_raise_clear_errors(cls, pattern):
    with pytest.raises(EnvError, match=pattern):
        _run(cls, rows=ROWS[:1])


def test_engine_controller_raises_the_same_errors_and_never_hangs():
    """The controller that drives a generation engine (vLLM's path, here on the torch generator) checks the
    environment's calls the same way: errors name environment, row and turn; a hanging step stops the run."""
    from posttrain.generation.engine_episodes import EngineEpisodeSampler
    from posttrain.generation.sampler import HFGenerator

    model, tok = tiny_model(), tiny_tokenizer()
    sampler = EngineEpisodeSampler(HFGenerator(model, tok), tok)

    def run(cls, rows, timeout=5.0):
        return sampler.run(cls, rows, PARAMS, budget=EpisodeBudget(max_turns=3, max_turn_tokens=3,
                                                                   env_timeout_s=timeout))

    with pytest.raises(EnvError, match=r"environment 'good' cannot use row 1 .*KeyError"):
        run(Good, ROWS)
    with pytest.raises(EnvError, match=r"environment 'raiser', row 0, turn 1: step raised RuntimeError: boom"):
        run(StepRaises, ROWS[:1])
    with pytest.raises(EnvError, match=r"row 0, turn 1: step returned dict .*expected a StepResult"):
        run(WrongStep, ROWS[:1])
    t0 = time.perf_counter()
    with pytest.raises(EnvError, match=r"environment 'hangs', row 0, turn 1: step: no answer within 0.5 s"):
        run(Hangs, ROWS[:1], timeout=0.5)
    assert time.perf_counter() - t0 < 10
    out = run(NeverDone, ROWS[:1])
    assert out.episodes[0].finish == "max_turns" and out.episodes[0].turns == 3


def test_an_environment_whose_constructor_raises_is_named(tmp_path):
    (tmp_path / "ctor.py").write_text("class Env:\n    def __init__(self):\n        raise RuntimeError('no corpus')\n")
    with pytest.raises(EnvError, match=r"environment '.*ctor.py:Env': its constructor raised RuntimeError: no corpus"):
        env_factory(f"{tmp_path / 'ctor.py'}:Env")
