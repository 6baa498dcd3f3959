"""Reward functions written for TRL's GRPOTrainer, used unchanged by `posttrain grpo rewards=examples/trl_rewards.py:correct`.

TRL calls them with keywords: `prompts`, `completions` (message lists when the prompts are conversational),
`completion_ids`, `trainer_state` and every dataset column (`answer` here); None means "does not apply".
"""

import re


def correct(completions, answer, **kwargs):
    """1.0 when the last number of the reply equals the row's answer, else 0.0."""
    rewards = []
    for completion, gold in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion[0]["content"])
        rewards.append(1.0 if numbers and numbers[-1] == str(gold) else 0.0)
    return rewards


def short(completions, **kwargs):
    """A small bonus for replies under 20 words; None (not applicable) for empty replies."""
    out = []
    for completion in completions:
        words = completion[0]["content"].split()
        out.append(None if not words else float(len(words) < 20))
    return out
