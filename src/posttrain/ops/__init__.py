"""Core tensor operations shared by every recipe: log-probs, masked reductions, KL estimators, advantages."""
