"""Writes examples/arithmetic_prompts.jsonl: 64 conversational prompts `What is a + b?` with an `answer` column.

    python examples/make_arithmetic_prompts.py
"""

import json
import random
from pathlib import Path

if __name__ == "__main__":
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? End with the number."}],
                     "answer": str(a + b)})
    out = Path(__file__).with_name("arithmetic_prompts.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out} ({len(rows)} rows)")
