"""posttrain: post-training for language models, test-time compute and diffusion, correct to the equation."""

__version__ = "0.1.0"
