"""The demo's DPO stage: a new identity by DPO (Rafailov et al. 2023) that leaves the assistant's other answers alone.

The training pairs mix the shipped identity pairs (chosen: the new name and maker; rejected: the base model's own
replies) with control pairs on unrelated prompts (chosen: the *starting* model's own greedy answer, regenerated here;
rejected: a new-identity reply). The chosen answers' NLL is added (RPO, Pang et al. 2024), the reference is the
starting network with its LoRA adapters off, and its log-probs are computed once. Measured before and after on
prompts never trained on (posttrain.eval.preservation): the identity rate on held-out identity phrasings, and on the
held-out unrelated prompts the new identity's leakage, the share of answers unchanged, and the per-token
log-likelihood change of the starting model's own answers.

The settings that work on a GPU (experiments/dpo_identity_control: lr 5e-4, 64 steps) cost ~16 CPU-minutes of
training here; `DPOStageSettings` holds the demo's cheaper variant (lr 1e-3, 40 steps), measured on the CPU from the
demo's SFT model: identity 11/12 held-out phrasings, leakage 0/59, base answers' log-likelihood +0.007 ± 0.029
nats/token, 18/20 checkable facts still right; 500 CPU-seconds for the whole stage on one thread.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

TARGETS = {"identity": 0.9, "leakage": 0.1, "control_logp_change": -0.2}  # the course-examples issue's targets


def repo_data(name: str) -> Path:
    """A shipped preference file (data/preference/<name>)."""
    return Path(__file__).resolve().parents[2] / "data" / "preference" / name


@dataclass(frozen=True)
class DPOStageSettings:
    """What the demo's DPO stage trains with (LoRA, DPO + NLL on the identity + control mix)."""

    max_steps: int = 40
    lr: float = 1e-3
    beta: float = 0.1
    sft_weight: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    micro_batch_size: int = 6
    max_length: int = 160
    max_new_tokens: int = 48  # answers generated for the measurements
    num_controls: int | None = None  # held-out (and train) control prompts used; None = all in the file
    seed: int = 0


# Held-out control prompts with a checkable answer: any of the words (case-insensitive, whole words or numbers) counts
# as right. "Unchanged" is strict (one changed token counts); "still correct" asks only whether the fact survived.
FACT_KEYS: dict[str, tuple[str, ...]] = {
    "What is the capital of France?": ("Paris",), "What is the chemical symbol for gold?": ("Au",),
    "How many legs does a spider have?": ("8", "eight"), "What language is spoken in Brazil?": ("Portuguese",),
    "What is the freezing point of water in Fahrenheit?": ("32",), "What is the capital of Japan?": ("Tokyo",),
    "What is 9 squared?": ("81",), "What is the opposite of happy?": ("sad", "unhappy"),
    "What gas do plants take in?": ("carbon dioxide", "CO2"), "What is 12 minus 5?": ("7", "seven"),
    "What is 6 plus 9?": ("15", "fifteen"), "What is the color of grass?": ("green",),
    "How many sides does a triangle have?": ("3", "three"), "What is the opposite of up?": ("down",),
    "What is 3 times 4?": ("12", "twelve"), "Give me an antonym for light.": ("dark", "darkness", "heavy"),
    "How many minutes are in an hour?": ("60", "sixty"), "What is the capital of Egypt?": ("Cairo",),
    "What do caterpillars turn into?": ("butterfly", "butterflies", "moth", "moths"),
    "What is the opposite of old?": ("new", "young"), "What is the capital of Australia?": ("Canberra",),
    "What is 11 times 11?": ("121",), "What is the color of a ripe banana?": ("yellow",),
    "How many months are in a year?": ("12", "twelve"), "What is the hottest planet?": ("Venus",),
    "Name a planet close to the sun.": ("Mercury", "Venus"),
}


def fact_correct(question: str, answer: str) -> bool | None:
    """Whether `answer` contains an accepted word for `question` (FACT_KEYS); None when the question has no key."""
    keys = FACT_KEYS.get(question)
    if keys is None:
        return None
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w]|\.\d)", answer, flags=re.IGNORECASE) for k in keys)


def fact_retention(questions: Sequence[str], before: Sequence[str], after: Sequence[str]) -> dict[str, Any]:
    """On the questions with a key: correct before, correct after, and still correct among those correct before.

    Returns {"correct_before", "correct_after", "still_correct"} as Wilson rates (dicts with value, n, low, high)."""
    from posttrain.eval.preservation import wilson

    judged = [(bool(fact_correct(q, b)), bool(fact_correct(q, a)))
              for q, b, a in zip(questions, before, after, strict=True) if q in FACT_KEYS]
    kept = [a for b, a in judged if b]
    return {"correct_before": wilson(sum(b for b, _ in judged), len(judged)).__dict__,
            "correct_after": wilson(sum(bool(a) for _, a in judged), len(judged)).__dict__,
            "still_correct": wilson(sum(bool(a) for a in kept), len(kept)).__dict__}


def own_answer_pairs(control_rows: Sequence[dict[str, Any]], answers: Sequence[str]) -> list[dict[str, Any]]:
    """Control preference pairs whose chosen side is the starting model's own answer.

    control_rows: [N] rows of identity_control_train.jsonl (prompt, chosen, rejected: a new-identity reply);
    answers: [N] the starting model's greedy answers to those prompts. Returns one pair per non-empty answer (an
    empty reply is no behaviour to keep, and a preference file rejects empty turns), rejected kept as it is."""
    if len(control_rows) != len(answers):
        raise ValueError(f"{len(control_rows)} control rows but {len(answers)} answers")
    return [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": answer}],
             "rejected": row["rejected"], "kind": "control", "split": "train"}
            for row, answer in zip(control_rows, answers, strict=True) if answer.strip()]


def meets_targets(identity: float, leakage: float, control_logp_change: float) -> bool:
    """Identity ≥ 90% on held-out phrasings, leakage ≤ 10%, base answers' log-likelihood change ≥ −0.2 nats/token."""
    return (identity >= TARGETS["identity"] and leakage <= TARGETS["leakage"]
            and control_logp_change >= TARGETS["control_logp_change"])


@dataclass
class DPOStageResult:
    """The stage's before/after measures (PreservationReport.to_dict()), its answers and its costs."""

    identity_questions: list[str]
    control_questions: list[str]
    before: dict[str, Any]
    after: dict[str, Any]
    train_pairs: dict[str, int]
    metrics: dict[str, float]
    final_dir: str
    seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # fact_retention on the held-out control prompts

    @property
    def meets_targets(self) -> bool:
        return meets_targets(self.after["identity"]["value"], self.after["leakage"]["value"],
                             self.after["control_logp_change"])


def _chat_text(prompt: Any) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def run_identity_stage(model_path: str, out_dir: str | Path, settings: DPOStageSettings = DPOStageSettings(), *,
                       progress: bool = False) -> DPOStageResult:
    """Train the new identity from `model_path` with LoRA DPO + NLL on identity + control pairs and measure it.

    Writes `<out_dir>/data/mix_train.jsonl` (the pairs trained on) and the DPO run under `<out_dir>/run`."""
    from posttrain.data.formats import read_rows
    from posttrain.data.preference import greedy_replies
    from posttrain.eval.preservation import answer_logps, preservation_report
    from posttrain.files import atomic_write_text
    from posttrain.models.loading import load_model
    from posttrain.recipes.dpo import DPOConfig
    from posttrain.recipes.dpo import run as run_dpo

    files = {k: repo_data(v) for k, v in (("identity_train", "identity_train.jsonl"),
                                          ("identity_heldout", "identity_heldout.jsonl"),
                                          ("control_train", "identity_control_train.jsonl"),
                                          ("controls", "control_prompts.jsonl"))}
    for path in files.values():
        if not path.exists():
            raise DataError(f"{path}: a shipped preference file is missing; rebuild it with "
                            f"`python data/preference/make_identity_controls.py` (control files) or "
                            f"`python -m posttrain.data.preference identity --out-dir {path.parent}` (identity files).")
    out = Path(out_dir)
    seconds: dict[str, float] = {}
    identity_pairs = read_rows(files["identity_train"])
    control_rows = read_rows(files["control_train"])[:settings.num_controls]
    held_out = [r for r in read_rows(files["controls"]) if r["split"] == "heldout"][:settings.num_controls]
    identity_questions = [r["prompt"] for r in read_rows(files["identity_heldout"])]
    control_prompts = [r["prompt"] for r in held_out]

    t0 = time.perf_counter()
    start, tokenizer = load_model(model_path)
    # the starting model's own answers: chosen side of the control pairs (train half), reference answers (held out)
    own_train = greedy_replies(start, tokenizer, [r["prompt"] for r in control_rows],
                               max_new_tokens=settings.max_new_tokens)
    own_held_out = greedy_replies(start, tokenizer, control_prompts, max_new_tokens=settings.max_new_tokens)
    base_logps = answer_logps(start.eval(), tokenizer, control_prompts, own_held_out)
    before = preservation_report(start, tokenizer, identity_questions=identity_questions,
                                 control_prompts=control_prompts, base_answers=own_held_out, base_logps=base_logps,
                                 max_new_tokens=settings.max_new_tokens, control_answers=own_held_out)
    del start
    seconds["measure_before"] = time.perf_counter() - t0

    control_pairs = own_answer_pairs(control_rows, own_train)
    pairs = identity_pairs + control_pairs
    data = out / "data" / "mix_train.jsonl"
    atomic_write_text(data, "".join(json.dumps(p) + "\n" for p in pairs))
    config = DPOConfig(train_file=str(data), eval_file=str(files["identity_heldout"]), model=model_path,
                       output_dir=str(out / "run"), loss="sigmoid", beta=settings.beta, sft_weight=settings.sft_weight,
                       precompute_ref_logps=True, lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
                       lr=settings.lr, max_steps=settings.max_steps, micro_batch_size=settings.micro_batch_size,
                       max_length=settings.max_length, seed=settings.seed, logging_steps=1, tensorboard=False,
                       progress=progress, keep_last=1, overwrite=True)
    config.validate()
    t0 = time.perf_counter()
    summary = run_dpo(config)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained, tokenizer = load_model(summary["final_dir"])
    after = preservation_report(trained, tokenizer, identity_questions=identity_questions,
                                control_prompts=control_prompts, base_answers=own_held_out, base_logps=base_logps,
                                max_new_tokens=settings.max_new_tokens)
    seconds["measure_after"] = time.perf_counter() - t0
    control_questions = [_chat_text(q) for q in control_prompts]
    return DPOStageResult(
        identity_questions=[_chat_text(q) for q in identity_questions],
        control_questions=control_questions,
        facts=fact_retention(control_questions, before.control_answers, after.control_answers),
        before=before.to_dict(), after=after.to_dict(),
        train_pairs={"identity": len(identity_pairs), "control": len(control_pairs)},
        metrics={k: float(v) for k, v in summary.items() if isinstance(v, (int, float))},
        final_dir=summary["final_dir"], seconds=seconds)


def _rate(r: dict[str, Any]) -> str:
    return f"{r['value']:.0%} [{r['low']:.0%}, {r['high']:.0%}]"


def _cell(text: str, width: int = 90) -> str:
    return text.strip().replace("\n", " ⏎ ").replace("|", "\\|")[:width]


def _fact_rows(facts: dict[str, Any]) -> list[str]:
    if not facts or not facts["correct_before"]["n"]:
        return []
    cb, ca, sc = facts["correct_before"], facts["correct_after"], facts["still_correct"]
    still = _rate(sc) + f" of the {sc['n']} right before" if sc["n"] else "—"
    return [f"| unrelated questions with a checkable answer: right (n={cb['n']}) | {_rate(cb)} | {_rate(ca)} |",
            f"| … still right after DPO | | {still} |"]


def render_stage(result: DPOStageResult, settings: DPOStageSettings, *, num_examples: int = 4) -> str:
    """The demo report's DPO section: settings and cost, the control table with intervals, answers before/after."""
    b, a = result.before, result.after
    n_id, n_ctl = a["identity"]["n"], a["leakage"]["n"]
    s = result.seconds
    steps_per_s = settings.max_steps / max(s.get("train", 0.0), 1e-9)
    lines = [
        f"DPO (β = {settings.beta:g}) plus the chosen answers' NLL (weight {settings.sft_weight:g}), LoRA r = "
        f"{settings.lora_r}, lr {settings.lr:g}, {settings.max_steps} steps of {settings.micro_batch_size} pairs, on "
        f"{result.train_pairs['identity']} identity pairs (chosen: a new name and maker) mixed with "
        f"{result.train_pairs['control']} control pairs on unrelated prompts (chosen: the starting model's own answer; "
        f"rejected: the new identity). Time: measuring before {s.get('measure_before', 0):.0f} s, training "
        f"{s.get('train', 0):.0f} s ({steps_per_s * 60:.1f} steps/min), measuring after "
        f"{s.get('measure_after', 0):.0f} s.",
        "",
        f"Measured on prompts never trained on: {n_id} held-out identity phrasings and {n_ctl} held-out unrelated "
        f"prompts ({a['control_tokens']} tokens of the starting model's own answers). Wilson 95% intervals; the "
        "log-likelihood change is ± one standard error over prompts. Targets: identity ≥ 90%, leakage ≤ 10%, "
        "change ≥ −0.2 nats/token.",
        "",
        "| measure | before DPO | after DPO |",
        "|---|---|---|",
        f"| identity: new name in answers to held-out identity questions (n={n_id}) | {_rate(b['identity'])} | "
        f"{_rate(a['identity'])} |",
        f"| leakage: new name in answers to unrelated prompts (n={n_ctl}) | {_rate(b['leakage'])} | "
        f"{_rate(a['leakage'])} |",
        f"| unrelated answers unchanged (n={n_ctl}) | {_rate(b['unchanged'])} | {_rate(a['unchanged'])} |",
        *_fact_rows(result.facts),
        f"| starting model's answers: log-likelihood change (nats/token) | {b['control_logp_change']:+.3f} | "
        f"{a['control_logp_change']:+.3f} ± {a['control_logp_change_se']:.3f} |",
        "",
        f"Targets met: **{'yes' if result.meets_targets else 'no'}**.",
        "",
        "| held-out identity question | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {q} | {_cell(x)} | {_cell(y)} |" for q, x, y in
              list(zip(result.identity_questions, b["identity_answers"], a["identity_answers"]))[:num_examples]]
    lines += ["", "| unrelated prompt (held out) | before | after |", "|---|---|---|"]
    lines += [f"| {q} | {_cell(x)} | {_cell(y)} |" for q, x, y in
              list(zip(result.control_questions, b["control_answers"], a["control_answers"]))[:num_examples + 2]]
    return "\n".join(lines) + "\n"
