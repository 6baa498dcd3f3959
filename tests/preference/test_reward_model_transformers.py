"""A trained causal reward model's final/ is an ordinary transformers checkpoint: AutoModelForSequenceClassification
loads it with its trained head (no missing `score.weight`) and scores exactly as posttrain does, padded or not."""

import json
import logging

import torch

from posttrain.data.tokenize import encode_preference
from posttrain.models.reward_model import reward_function
from posttrain.recipes.reward import RewardConfig, run


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "cat", "dog", "tree", "sky"]
    out = []
    for _ in range(n):
        a, b = (words[i] for i in torch.randint(0, len(words), (2,), generator=g).tolist())
        out.append({"prompt": [{"role": "user", "content": f"Rate the {a}."}],
                    "chosen": [{"role": "assistant", "content": f"It is great, {b}."}],
                    "rejected": [{"role": "assistant", "content": f"It is awful, {b}."}]})
    return out


def test_final_loads_with_auto_model_for_sequence_classification(tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(16, 0)))
    config = RewardConfig(train_file=str(train), model="tiny", max_steps=4, micro_batch_size=4, lr=3e-3,
                          max_length=96, progress=False, tensorboard=False, output_dir=str(tmp_path / "rm"))
    final = run(config)["final_dir"]

    with caplog.at_level(logging.WARNING):
        hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert "newly initialized" not in caplog.text and "score.weight" not in caplog.text
    assert hf.config.num_labels == 1 and type(hf).__name__.endswith("ForSequenceClassification")
    assert hf.score.weight.abs().sum() > 0  # the trained head, not a zero or random one
    assert not (tmp_path / "rm" / "config.json").exists()  # the run's settings are run_config.json

    rows = _rows(3, 5)
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    ours = reward_function(final, batch_size=4)(prompts=prompts, completions=completions)

    tok = AutoTokenizer.from_pretrained(final)
    seqs = []
    for p, c in zip(prompts, completions):  # what a transformers user feeds: the full chat rendering
        ids = encode_preference(tok, {"prompt": p, "chosen": c, "rejected": c})
        seqs.append(ids["prompt_ids"] + ids["chosen_ids"])
    with torch.no_grad():
        alone = [hf(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
        T = max(map(len, seqs))
        padded = torch.full((len(seqs), T), tok.pad_token_id)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            padded[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        batched = hf(input_ids=padded, attention_mask=mask).logits[:, 0].tolist()
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(ours), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(ours), atol=1e-5, rtol=1e-5)
    assert len({round(s, 4) for s in ours}) > 1  # the scores differ between answers
