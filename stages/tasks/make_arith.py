"""Writes ``data/arith.jsonl``: the shipped arithmetic set (deterministic, 200 rows).

Run ``python -m stages.tasks.make_arith`` to regenerate. Rows are
``{"prompt": "12+7=", "answer": "19"}``: additions and subtractions of numbers below 50,
so every answer has at most 2 digits and a sign, which the char tokenizer covers.
"""

import json
import random
from pathlib import Path

ARITH_PATH = Path(__file__).with_name("data") / "arith.jsonl"
ROWS = 200
"""Small enough to ship and read instantly; large enough that memorising is not trivial."""
OPERAND_LIMIT = 50
"""Operands are drawn from [0, 50): answers fit in 2 digits (+ sign)."""
SEED = 20240601


def rows() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    while len(out) < ROWS:
        a, b = rng.randrange(OPERAND_LIMIT), rng.randrange(OPERAND_LIMIT)
        op = rng.choice("+-")
        prompt = f"{a}{op}{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": str(a + b if op == "+" else a - b)})
    return out


if __name__ == "__main__":
    ARITH_PATH.parent.mkdir(parents=True, exist_ok=True)
    with ARITH_PATH.open("w") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {ARITH_PATH}")
