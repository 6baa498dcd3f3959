"""Chain-of-thought prompt templates: few-shot exemplars (Wei et al. 2022, arXiv 2201.11903) and the zero-shot
"Let's think step by step" trigger (Kojima et al. 2022, arXiv 2205.11916).

A prompt is the question, then the template's reasoning instruction, then the answer-format instruction that the
task's answer extractor expects (an `Answer: X` last line, a \\boxed{X}, or <answer>X</answer>). Templates are
plain format strings in one dict, so a config names one and a test can read exactly what the model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# what to ask for, per answer extractor (rewards.gym.EXTRACTORS names, plus "boxed")
ANSWER_FORMATS: dict[str, str] = {
    "final_line": "Give the final answer alone on the last line as `Answer: <answer>`.",
    "last_number": "End with the final answer as a number.",
    "answer_tag": "Put the final answer inside <answer></answer> tags.",
    "boxed": "Put the final answer inside \\boxed{}.",
    "raw": "",
}

# reasoning instruction placed between the question and the answer format
TEMPLATES: dict[str, str] = {
    "direct": "{question}\n\n{answer_format}",
    "brief": "{question}\n\nThink briefly, then answer. {answer_format}",
    "step_by_step": "{question}\n\nLet's think step by step. {answer_format}",  # Kojima et al., Table 1 trigger
    "few_shot": "{exemplars}Question: {question}\n\nLet's think step by step. {answer_format}",  # Wei et al., with exemplars
}


@dataclass(frozen=True)
class Exemplar:
    """A worked example for few-shot CoT: the question, its reasoning (may be empty) and its answer."""

    question: str
    reasoning: str
    answer: str


def _answer_line(answer: str, answer_format: str) -> str:
    return {"final_line": f"Answer: {answer}", "answer_tag": f"<answer>{answer}</answer>",
            "boxed": f"\\boxed{{{answer}}}"}.get(answer_format, answer)


def render(question: str, template: str = "direct", answer_format: str = "final_line",
           exemplars: Sequence[Exemplar] = ()) -> str:
    """The user message for `question` under `template` (a TEMPLATES key) and `answer_format` (ANSWER_FORMATS)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chain-of-thought template {template!r}; expected one of {sorted(TEMPLATES)}")
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer format {answer_format!r}; expected one of {sorted(ANSWER_FORMATS)}")
    if template == "few_shot" and not exemplars:
        raise ValueError("the few_shot template needs exemplars")
    shots = "".join(
        f"Question: {e.question}\n{(e.reasoning.strip() + chr(10)) if e.reasoning.strip() else ''}"
        f"{_answer_line(e.answer, answer_format)}\n\n" for e in exemplars)
    text = TEMPLATES[template].format(question=question.strip(), answer_format=ANSWER_FORMATS[answer_format],
                                      exemplars=shots)
    return text.strip()
