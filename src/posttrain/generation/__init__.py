"""Generation: the KV-cache rollout engine behind the `Generator` interface, decoding strategies, beam search."""

from posttrain.generation.sampler import Generator, HFGenerator, Rollouts, SamplingParams, encode_prompts

__all__ = ["Generator", "HFGenerator", "Rollouts", "SamplingParams", "encode_prompts"]
