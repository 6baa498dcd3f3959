"""Writes data/sft/arithmetic_train.jsonl, the SFT data of configs/sft_arithmetic.yaml: the same 320 chain_sum
problems and worked answers that `posttrain demo` trains on (reasoning-gym, generator seed 1).

    .venv/bin/python data/sft/make_arithmetic.py
"""

import json
from pathlib import Path

from posttrain.demo import DemoConfig, task_rows, worked_answer

if __name__ == "__main__":
    config = DemoConfig()
    rows = task_rows(config.task, config.train_problems, seed=config.seed + 1)
    out = Path(__file__).with_name("arithmetic_train.jsonl")
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": [
        {"role": "assistant", "content": worked_answer(r)}]}) + "\n" for r in rows))
    print(f"wrote {out} ({len(rows)} rows)")
