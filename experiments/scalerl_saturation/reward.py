"""The toy verifiable reward of experiments/scalerl_saturation: the share of lowercase ASCII letters in the reply,
on the prompts marked solvable; 0 on the others.

A random tiny model starts near 26/259 ≈ 0.10 on a solvable prompt (its byte vocabulary is nearly uniform) and GRPO
can drive it to 1.0 there, while a quarter of the prompts can never be rewarded, so the mean reward saturates at
about 0.75, below the fit's bound of 1 (as ScaleRL's asymptotes sit below 1 where problems stay unsolved).
TRL's calling convention: (prompts, completions, **columns), with the rows' `solvable` column."""

import string

LOWER = set(string.ascii_lowercase)


def lowercase_share(prompts, completions, solvable=None, **kwargs):
    """Per completion: lowercase letters / characters (0 for an empty reply or an unsolvable prompt)."""
    solvable = solvable if solvable is not None else [True] * len(completions)
    return [sum(ch in LOWER for ch in c) / len(c) if c and ok else 0.0
            for c, ok in zip(completions, solvable, strict=True)]
