"""Training infrastructure: optimizer and schedule, atomic resumable checkpoints, logging, distributed setup."""
