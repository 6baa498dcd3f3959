"""`posttrain eval`: a model on a task with a decoding or test-time strategy; accuracy, pass@k, maj@k and cost.

Strategies:
    greedy, temperature, top_k, top_p, low_temperature, beam, power    n completions per problem from that decoder
    majority, weighted_majority        n samples from `sampler`, answer by (length-normalized weighted) vote
    best_of_n_verifier                 n samples, the one the task's verifier accepts (it knows the reference
                                       answer, so this is an oracle: its accuracy is pass@n)
    best_of_n_reward                   n samples, the one a reward model from `posttrain reward` scores highest
    particles                          particle filtering with n particles (ttc/particles.py), resampled by the
                                       reward model's score of each partial solution, or, without `reward_model`,
                                       by the task's verifier on finished ones (an oracle, like best_of_n_verifier)

Metrics (eval/metrics.py): accuracy (of the selected answer for selection strategies; else the mean over the n
completions, i.e. pass@1), unbiased pass@k and maj@k for each k ≤ n in `pass_k`, mean generated tokens per
completion, tokens fed through the model per output token (output = the returned answers: all n completions for a
decoder, the selected one for a selection strategy), and wall time per problem (decoding and selection; scoring
excluded). `evaluate(...)` is the Python API; `run(config)` the command, which prints a table and writes a JSON file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.config import field
from posttrain.envs.formats import ToolFormatName
from posttrain.errors import ConfigError
from posttrain.eval.metrics import majority_at_k, mean_stderr, pass_at_k
from posttrain.eval.tasks import Problem, Task, make_task
from posttrain.generation.backends import GenerationOptions, close_generator, rollout_engine
from posttrain.generation.strategies import DECODERS, Decoded, DecodeOptions, GenerateFn
from posttrain.models.loading import EMBEDDED_DEFAULT

SELECTORS = ("majority", "weighted_majority", "best_of_n_verifier", "best_of_n_reward", "particles")
STRATEGIES = tuple(DECODERS) + SELECTORS + ("react",)  # react: tool use through the ReAct controller (eval/react.py)


@dataclass
class EvalConfig(GenerationOptions):
    model: str = field(EMBEDDED_DEFAULT, help="model: the embedded smollm2-135m-instruct, a local HF folder, or tiny")
    task: str = field("chain_sum", help="a reasoning-gym task name, 'humaneval', or a .jsonl file with prompt/answer")
    task_kwargs: dict = field(default_factory=dict, help="reasoning-gym generator settings, e.g. {min_terms: 2}")
    num_problems: int = field(50, help="problems to evaluate (JSONL: the first ones; HumanEval: a seeded subset)")
    seed: int = field(0, help="problem generator seed; sampling seeds derive from it")
    strategy: str = field("greedy", help=f"one of: {', '.join(STRATEGIES)}")
    sampler: str = field("temperature", help="decoder that draws the n candidates of a selection strategy")
    num_samples: int = field(1, help="n: completions per problem (pass@k and maj@k need k <= n)")
    pass_k: list[int] = field(default_factory=lambda: [1], help="k values for pass@k and maj@k")
    max_new_tokens: int = field(256, help="generation length limit")
    temperature: float = field(1.0, help="sampling temperature (temperature, top_k, top_p, selection samplers)")
    top_k: int = field(50, help="k for the top_k strategy")
    top_p: float = field(0.95, help="p for the top_p strategy")
    alpha: float = field(4.0, help="power α: power sampling targets p^α; low_temperature uses τ = 1/α")
    block_size: int = field(16, help="power sampling block size B")
    mcmc_steps: int = field(4, help="power sampling MH steps per block")
    lookahead_top_k: int = field(4, help="scalable_power: candidate tokens K per step")
    lookahead_rollouts: int = field(4, help="scalable_power: rollouts M per candidate")
    lookahead_horizon: int = field(8, help="scalable_power: look-ahead tokens H per rollout")
    particle_step_tokens: int = field(16, help="particles: most tokens per reasoning step (a newline also ends one)")
    beam_width: int = field(4, help="beam width")
    length_penalty: float = field(0.0, help="beam score = Σ log p / length^λ")
    batch_size: int = field(16, help="prompts per sampler call (power: chains per batch)")
    extract: str = field("last_number", help="answer extraction: last_number, final_line, answer_tag, boxed, raw")
    template: str = field("brief", help="chain-of-thought template (ttc/cot.py): direct, brief, step_by_step")
    answer_format: str = field("", help="answer instruction (ttc/cot.py ANSWER_FORMATS); empty: the one `extract` reads")
    num_shots: int = field(0, help="few-shot exemplars for reasoning-gym tasks (0 = zero-shot)")
    chat: bool = field(True, help="HumanEval: ask a chat model for the whole function (false: raw stub)")
    reward_model: str = field("", help="folder of a reward model saved by `posttrain reward` (best_of_n_reward)")
    perplexity_file: str = field("", help="a text/chat/prompt-completion file: report the model's perplexity on it "
                                          "(with the token count) instead of evaluating the task")
    perplexity_max_length: int = field(1024, help="rows of perplexity_file are cut to this many tokens")
    output_dir: str = field("runs/eval", help="where the JSON result goes")
    save_samples: bool = field(True, help="keep every completion in the JSON file")
    tools: list[str] = field(default_factory=lambda: ["calculator"], help="react: tools (calculator, python, search)")
    tool_format: ToolFormatName = field("auto", help="react: auto (chat-template tool calls if supported), react or chat")
    max_turns: int = field(4, help="react: model turns per episode (max_new_tokens is the budget per turn)")
    max_episode_tokens: int = field(512, help="react: tokens per episode after the prompt (model + observations)")
    device: str = field("auto", help="auto (cuda when available, as in training), cpu or cuda")
    dtype: str = field("float32", help="float32, bfloat16 or float16")

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"key 'strategy': unknown strategy {self.strategy!r}; expected one of {list(STRATEGIES)}")
        if self.sampler not in DECODERS:
            raise ConfigError(f"key 'sampler': unknown decoder {self.sampler!r}; expected one of {list(DECODERS)}")
        if self.num_samples < 1:
            raise ConfigError("key 'num_samples' must be >= 1")
        self.validate_generation()
        decoder = self.sampler if self.strategy in SELECTORS else self.strategy
        if self.generation_backend != "hf" and decoder in ("beam", "power"):
            raise ConfigError(f"key 'generation_backend': {self.generation_backend} samples only; strategy/sampler "
                              f"'{self.strategy}'/'{self.sampler}' needs generation_backend=hf")
        if self.max_turns < 1 or self.max_episode_tokens < 1:
            raise ConfigError("keys 'max_turns' and 'max_episode_tokens' must be >= 1")
        if self.strategy == "react":
            from posttrain.envs.tools import TOOLS

            unknown = [t for t in self.tools if t not in TOOLS]
            if unknown:
                raise ConfigError(f"key 'tools': unknown tool(s) {unknown}; expected some of {sorted(TOOLS)}")
        if self.strategy == "best_of_n_reward" and not self.reward_model:
            raise ConfigError("strategy best_of_n_reward needs key 'reward_model' (a folder saved by posttrain reward)")

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                             top_p=self.top_p, alpha=self.alpha, block_size=self.block_size,
                             mcmc_steps=self.mcmc_steps, beam_width=self.beam_width,
                             lookahead_top_k=self.lookahead_top_k, lookahead_rollouts=self.lookahead_rollouts,
                             lookahead_horizon=self.lookahead_horizon,
                             length_penalty=self.length_penalty, batch_size=self.batch_size, seed=self.seed)


def _render(tokenizer, problems: Sequence[Problem]) -> list[str]:
    from posttrain.data.tokenize import prompt_text

    return [prompt_text(tokenizer, p.prompt, chat=not p.raw) for p in problems]


def _select(strategy: str, problems, texts, generate: GenerateFn, task: Task, n: int, reward_model: str):
    from posttrain.ttc.best_of_n import STRATEGIES as TTC

    by_text = {t: p for t, p in zip(texts, problems)}
    if strategy in ("majority", "weighted_majority"):
        return TTC["majority" if strategy == "majority" else "weighted_majority"](
            texts, generate, n=n, extract=task.extract, equivalent=getattr(task, "equivalent", None))
    if strategy == "best_of_n_verifier":
        def score(prompts, completions):
            return task.score([by_text[p] for p in prompts], completions)
    else:
        from posttrain.models.reward_model import reward_function

        rm = reward_function(reward_model)

        def score(prompts, completions):
            return rm([by_text[p].prompt for p in prompts], list(completions))
    return TTC["best_of_n"](texts, generate, score, n=n, extract=task.extract)


def _particles(model, tokenizer, problems, texts, task: Task, n: int, options: DecodeOptions, reward_model: str,
               step_tokens: int) -> tuple[Decoded, list[int]]:
    """Particle filtering (ttc/particles.py) as a Decoded of the final particles, and the chosen one per problem."""
    from posttrain.ttc.particles import ParticleFilter, ParticleParams

    by_text = {t: p for t, p in zip(texts, problems)}
    if reward_model:
        from posttrain.models.reward_model import reward_function

        rm = reward_function(reward_model)

        def score(prompts, completions):
            return rm([by_text[p].prompt for p in prompts], list(completions))
    else:
        def score(prompts, completions):
            return task.score([by_text[p] for p in prompts], completions)
    newline = tuple(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))
    params = ParticleParams(num_particles=n, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                            step_tokens=step_tokens, step_stop_ids=newline,
                            potential="product" if reward_model else "last", select="max_reward",
                            seed=options.seed)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = ParticleFilter(model, tokenizer).generate(ids, score, params, prompts=list(texts))
    decoded = Decoded([[t or "" for t in r.texts] for r in out.results], [r.token_ids for r in out.results],
                      [[[] for _ in r.token_ids] for r in out.results], out.forward_tokens, out.wall_s,
                      {"scored_texts": float(out.scored_texts)})
    return decoded, [r.chosen for r in out.results]


def evaluate(model, tokenizer, task: Task, problems: Sequence[Problem], strategy: str = "greedy", *,
             options: DecodeOptions | None = None, num_samples: int = 1, pass_k: Sequence[int] = (1,),
             sampler: str = "temperature", reward_model: str = "", keep_samples: bool = False,
             step_tokens: int = 16, react: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate `strategy` on `problems`; returns {"metrics": {...}, "problems": [...] (if keep_samples)}.
    react: the react strategy's options (tools, tool_format, max_turns, max_episode_tokens)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    options = options or DecodeOptions()
    n, B = num_samples, len(problems)
    texts = _render(tokenizer, problems)
    if strategy == "react":
        from posttrain.eval.react import evaluate_react

        return evaluate_react(model, tokenizer, task, problems, options=options, num_samples=num_samples,
                              pass_k=pass_k, keep_samples=keep_samples, **(react or {}))
    start = time.perf_counter()
    selected: list[int | None] | None = None
    if strategy in DECODERS:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        decoded: Decoded = DECODERS[strategy](model, tokenizer, ids, n, options)
    elif strategy == "particles":
        decoded, chosen = _particles(model, tokenizer, problems, texts, task, n, options, reward_model, step_tokens)
        selected = list(chosen)
    else:
        generate = GenerateFn(model, tokenizer, sampler, options)
        results = _select(strategy, problems, texts, generate, task, n, reward_model)
        decoded = generate.last
        selected = [r.index for r in results]
    wall_s = time.perf_counter() - start

    flat_problems = [p for p in problems for _ in range(n)]
    flat_correct = task.score(flat_problems, [t for row in decoded.texts for t in row])  # [B*G]
    correct = [flat_correct[b * n:(b + 1) * n] for b in range(B)]  # [B][G]
    answers = [[task.extract(t) for t in row] for row in decoded.texts]  # [B][G]
    if selected is None:
        per_problem = [sum(row) / n for row in correct]
        output_tokens = decoded.generated_tokens
    else:
        per_problem = [0.0 if i is None else row[i] for row, i in zip(correct, selected)]
        output_tokens = sum(len(ids[i or 0]) for ids, i in zip(decoded.token_ids, selected))
    acc = mean_stderr(per_problem)
    metrics: dict[str, Any] = {
        "strategy": strategy if selected is None else f"{strategy}[{sampler}]",
        "num_problems": B, "num_samples": n, "accuracy": acc.mean, "accuracy_stderr": acc.stderr,
        "mean_generated_tokens": decoded.generated_tokens / (B * n),
        "forward_tokens": decoded.forward_tokens,
        "forward_per_output_token": decoded.forward_tokens / max(1, output_tokens),
        "wall_s_per_problem": wall_s / max(1, B),
    }
    for k in sorted(set(pass_k)):
        if k > n:
            continue
        num_correct = [round(sum(row)) for row in correct]
        metrics[f"pass@{k}"] = float(pass_at_k(n, num_correct, k).mean())
        if task.votable:
            same = getattr(task, "equivalent", None)
            metrics[f"maj@{k}"] = sum(majority_at_k(a, [c == 1.0 for c in row], k, same)
                                      for a, row in zip(answers, correct)) / B
    metrics.update({f"{key}": value for key, value in decoded.stats.items()})
    out: dict[str, Any] = {"metrics": metrics}
    if keep_samples:
        out["problems"] = [{"id": p.id, "prompt": p.prompt, "answer": p.answer, "completions": decoded.texts[b],
                            "answers": answers[b], "correct": correct[b],
                            "selected": None if selected is None else selected[b]} for b, p in enumerate(problems)]
    return out


COLUMNS = [("strategy", "strategy", "{}"), ("accuracy", "acc", "{:.3f}"), ("accuracy_stderr", "±", "{:.3f}"),
           ("mean_generated_tokens", "gen tok", "{:.1f}"), ("forward_per_output_token", "fwd/out tok", "{:.2f}"),
           ("wall_s_per_problem", "s/problem", "{:.2f}")]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of metrics dicts: the fixed columns, then any pass@k / maj@k present."""
    extra = sorted({k for r in rows for k in r if k.startswith(("pass@", "maj@"))},
                   key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    if any("tool_call_validity" in r for r in rows):
        extra.append("tool_call_validity")
    columns = COLUMNS + [(k, "tool valid" if k == "tool_call_validity" else k, "{:.3f}") for k in extra]
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt.format(r[key]) if key in r and not (isinstance(r[key], float) and math.isnan(r[key]))
                      else "-" for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _device(name: str) -> str:
    """`auto`: cuda when available, else cpu (as the training commands do)."""
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _run_perplexity(config: EvalConfig) -> dict[str, Any]:
    from posttrain.eval.perplexity import file_perplexity
    from posttrain.models import load_model
    from posttrain.train.checkpoint import atomic_write_text

    if not Path(config.perplexity_file).exists():
        raise ConfigError(f"key 'perplexity_file': file '{config.perplexity_file}' does not exist")
    model, tokenizer = load_model(config.model, dtype=config.dtype, device=_device(config.device))
    metrics = file_perplexity(model, tokenizer, config.perplexity_file, max_length=config.perplexity_max_length,
                              batch_size=config.batch_size)
    result = {"config": asdict(config), "metrics": metrics}
    print(f"{config.perplexity_file} · model {config.model}: perplexity {metrics['perplexity']:.3f} "
          f"(nll {metrics['nll']:.4f} nats/token over {metrics['num_tokens']} tokens, {metrics['num_rows']} rows)")
    path = Path(config.output_dir) / f"eval_perplexity_{Path(config.perplexity_file).stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return result


def run(config: EvalConfig) -> dict[str, Any]:
    """`posttrain eval`: load the model, run the strategy on the task's problems, print and save the metrics."""
    from posttrain.models import load_model
    from posttrain.train.checkpoint import atomic_write_text
    from posttrain.train.state import phase

    if config.perplexity_file:
        return _run_perplexity(config)

    task = make_task(config.task, config.task_kwargs, extract=config.extract, template=config.template,
                     answer_format=config.answer_format or None, num_shots=config.num_shots, chat=config.chat)
    problems = task.problems(config.num_problems, config.seed)
    with phase(f"loading {config.model}"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=_device(config.device))
        if config.generation_backend != "hf":  # the decoders sample on the engine instead of the torch model
            model = rollout_engine(config, model, tokenizer, seed=config.seed, dtype=config.dtype)
    with phase(f"{config.strategy} on {len(problems)} problems × {config.num_samples} samples"):
        result = evaluate(model, tokenizer, task, problems, config.strategy, options=config.decode_options(),
                          num_samples=config.num_samples, pass_k=config.pass_k, sampler=config.sampler,
                          reward_model=config.reward_model, keep_samples=config.save_samples,
                          step_tokens=config.particle_step_tokens,
                          react={"tools": config.tools, "tool_format": config.tool_format,
                                 "max_turns": config.max_turns, "max_episode_tokens": config.max_episode_tokens})
    result = {"config": asdict(config), **result}
    print(f"{config.task} · {len(problems)} problems · model {config.model}")
    print(format_table([result["metrics"]]))
    path = Path(config.output_dir) / f"eval_{task.name}_{config.strategy}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    close_generator(model)
    return result
