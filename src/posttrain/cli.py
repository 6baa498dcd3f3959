"""The `posttrain` command line: `posttrain <command> --config X.yaml [key=value ...] [--resume]`.

Every command is a recipe module exposing a config dataclass and a `run(config, resume=...)` function. Overrides
can be written `key=value` or `--key value`; both go through the same checked config loader
(posttrain.config.parse_overrides).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

from posttrain.errors import ConfigError, PosttrainError

# command -> (module, config class, entry function). Modules are imported lazily so `posttrain --help` is instant.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "sft": ("posttrain.recipes.sft", "SFTConfig", "run"),
    "dpo": ("posttrain.recipes.dpo", "DPOConfig", "run"),
    "reward": ("posttrain.recipes.reward", "RewardConfig", "run"),
    "grpo": ("posttrain.recipes.grpo", "GRPOConfig", "run"),
    "ppo": ("posttrain.recipes.ppo", "PPOConfig", "run"),
    "kto": ("posttrain.recipes.kto", "KTOConfig", "run"),
    "online-dpo": ("posttrain.recipes.online_dpo", "OnlineDPOConfig", "run"),
    "distill": ("posttrain.recipes.distill", "DistillConfig", "run"),
    "eval": ("posttrain.eval.runner", "EvalConfig", "run"),
    "scaling": ("posttrain.eval.scaling_cli", "ScalingConfig", "run"),
    "diffusion train": ("posttrain.diffusion.recipe", "DiffusionTrainConfig", "train"),
    "diffusion sample": ("posttrain.diffusion.recipe", "DiffusionSampleConfig", "sample"),
    "demo": ("posttrain.demo", "DemoConfig", "run"),
    "serve": ("posttrain.generation.server", "ServeConfig", "serve"),
}

DESCRIPTIONS = {
    "sft": "supervised fine-tuning, loss on completion/assistant tokens only",
    "dpo": "direct preference optimization and its variants (ipo, ipo_avg, hinge, simpo, orpo, unweighted, preferred_ft, TR-DPO)",
    "reward": "Bradley-Terry reward model on preference pairs",
    "grpo": "online RL with verifiable rewards: GRPO, DAPO, Dr. GRPO, ScaleRL/CISPO, GSPO, SAPO, DPPO, RLOO",
    "ppo": "RLHF with PPO, a value head and a learned reward model",
    "kto": "KTO on unpaired desirable/undesirable answers (or pairs, split)",
    "online-dpo": "online DPO: two samples per prompt, ranked by a reward model or verifier, a DPO step",
    "distill": "teacher-to-student distillation: off-policy (sequence/token-level) or on-policy (reverse KL, GKD)",
    "eval": "evaluate a model on a task with a decoding / test-time strategy",
    "scaling": "fit ScaleRL's sigmoid compute-performance law to an RL run's metrics.jsonl",
    "diffusion train": "train a diffusion denoiser (2-D data or 8x8 digits)",
    "diffusion sample": "sample from a trained diffusion denoiser with DDPM or DDIM",
    "demo": "the end-to-end demo on the embedded SmolLM2, with a report",
    "serve": "a vLLM generation server for RL in server mode (generation_backend=vllm vllm_mode=server)",
}


def _load_command(name: str):
    module_name, config_name, fn_name = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, fn_name)


def _quiet_libraries() -> None:
    """Our own progress bar and messages are enough; silence transformers' per-shard bars and info logs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _check_keys_early(name: str, config_path: str | None, overrides: list[str]) -> None:
    """Report an unknown key before the recipe (and torch) is imported; the full check runs after the import."""
    import yaml

    from posttrain.config import parse_overrides, unknown_key_error
    from posttrain.config_keys import accepted_keys

    module, class_name, _ = COMMANDS[name]
    accepted = accepted_keys(module, class_name)
    if accepted is None:
        return
    names = sorted(accepted)
    if config_path is not None and os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError:
            loaded = None  # the full loader reports it
        if isinstance(loaded, dict):
            for key in loaded:
                if key not in accepted:
                    raise unknown_key_error(str(key), class_name, names, config_path)
    for key in parse_overrides(overrides):
        if key not in accepted:
            raise unknown_key_error(key, class_name, names, "command line")


def _take_resume(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove `--resume [DIR]` / `--resume=DIR` from argv. A following word is DIR only when it is not itself an
    override (`key=value`, `--key`), so `--resume lr=1e-5` resumes from the latest checkpoint and sets lr."""
    out: list[str] = []
    resume = None
    i = 0
    while i < len(argv):
        item = argv[i]
        if item == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and "=" not in nxt and not nxt.startswith("-"):
                resume, i = nxt, i + 2
                continue
            resume = "latest"
        elif item.startswith("--resume="):
            resume = item.split("=", 1)[1] or "latest"
        else:
            out.append(item)
        i += 1
    return out, resume


def main(argv: list[str] | None = None) -> int:
    """Run `posttrain <command> ...` (argv defaults to sys.argv[1:]); returns the exit status (2 for a usage or input error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: posttrain <command> [--config FILE.yaml] [key=value ...] [--resume]\n\ncommands:")
        for name, text in DESCRIPTIONS.items():
            print(f"  {name:<18} {text}")
        print("\n`posttrain <command> --help` lists the command's keys.")
        return 0
    name = argv.pop(0)
    if name == "diffusion":
        if not argv or argv[0] not in ("train", "sample"):
            asked = bool(argv) and argv[0] in ("-h", "--help")
            lines = ["usage: posttrain diffusion train|sample [--config FILE.yaml] [key=value ...]", "", "subcommands:"]
            lines += [f"  {n.split()[1]:<8} {DESCRIPTIONS[n]}" for n in ("diffusion train", "diffusion sample")]
            lines += ["", "`posttrain diffusion train --help` lists the subcommand's keys."]
            print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        name = f"diffusion {argv.pop(0)}"
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"posttrain: unknown command '{name}'.{hint}", file=sys.stderr)
        return 2

    argv, resume = _take_resume(argv)
    parser = argparse.ArgumentParser(prog=f"posttrain {name}", description=DESCRIPTIONS[name], add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    try:
        if not args.help:
            _check_keys_early(name, args.config, rest)
        _quiet_libraries()
        config_cls, fn = _load_command(name)
        resumable = "resume" in inspect.signature(fn).parameters
        if args.help:
            from posttrain.config import config_help

            usage = f"usage: posttrain {name} [--config FILE.yaml] [key=value ...]"
            print(f"{usage} [--resume [DIR]]\n" if resumable else f"{usage}\n")
            print(f"{DESCRIPTIONS[name]}\n\nkeys:\n{config_help(config_cls)}")
            return 0
        if resume is not None and not resumable:
            raise ConfigError(f"'posttrain {name}' has no checkpoints to resume from; drop --resume.")
        from posttrain.config import load_config

        config = load_config(config_cls, args.config, rest)
        kwargs = {"resume": resume} if resume is not None else {}
        fn(config, **kwargs)
    except PosttrainError as e:
        print(f"posttrain {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a recipe stopped by Ctrl-C says where its checkpoint is
        print(f"posttrain {name}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
