"""Test helpers for tests/envs: a scripted policy that runs through the real rollout engine."""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


class ForcedLM(nn.Module):
    """A 'model' that puts all its mass on the next token of one fixed sequence, read off the position id: a scripted
    policy run through the real engine (prefill, cache bookkeeping, observation chunks and all)."""

    def __init__(self, sequence: list[int], vocab: int, eos: int):
        super().__init__()
        self.sequence, self.vocab = sequence, vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"eos_token_id": eos})()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=1):
        rows = input_ids.shape[0]
        logits = torch.full((rows, 1, self.vocab), -1e4)
        for r in range(rows):
            nxt = int(position_ids[r, -1]) + 1
            logits[r, 0, self.sequence[nxt] if nxt < len(self.sequence) else 0] = 0.0
        return CausalLMOutputWithPast(logits=logits)


def write_env_job(root, world_size: int, out_name: str) -> dict:
    """Keys of a small GRPO run with the test environment letter_env.py:LetterEnv (tiny model, 2 steps, 4 prompts of
    4 episodes per step, held-out accuracy on 3 rows); the data files are written under root."""
    import json
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train, held_out = root / "prompts.jsonl", root / "held_out.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Say something #{i}{' please' * (i % 3)}"}) + "\n"
                             for i in range(8)))
    held_out.write_text("".join(json.dumps({"prompt": f"Name a thing #{i}"}) + "\n" for i in range(3)))
    env = Path(__file__).resolve().parent / "letter_env.py"
    return dict(train_file=str(train), eval_file=str(held_out), model="tiny", output_dir=str(root / out_name),
                num_generations=4, prompts_per_step=4, max_new_tokens=5, micro_batch_size=4, lr=1e-2, max_steps=2,
                progress=False, tensorboard=False, seed=0, env=f"{env}:LetterEnv", max_turns=2,
                max_episode_tokens=64, temperature=1.0)
