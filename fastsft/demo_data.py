"""The demo's synthetic SFT task: reverse a short list of letters (answers are checkable).

    python -m fastsft.demo_data            # rewrites examples/data/reverse_{train,eval}.jsonl

Each record is a chat: the user asks ``reverse: q f k a``, the assistant answers
``a k f q``. The files in examples/data/ were written by this script with the
default arguments; the same seed always gives the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string
from typing import List, Tuple

LETTERS = string.ascii_lowercase


def make_example(rng: random.Random, min_len: int, max_len: int) -> Tuple[str, str]:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))]
    return "reverse: " + " ".join(letters), " ".join(reversed(letters))


def make_records(n_train: int, n_eval: int, *, seed: int = 0, min_len: int = 3, max_len: int = 6) -> Tuple[List[dict], List[dict]]:
    """Train and held-out records; no held-out prompt appears in the training set."""
    rng = random.Random(seed)
    seen = set()
    pairs = []
    while len(pairs) < n_train + n_eval:
        prompt, answer = make_example(rng, min_len, max_len)
        if prompt in seen:
            continue
        seen.add(prompt)
        pairs.append((prompt, answer))

    def record(pair):
        return {"messages": [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]}

    return [record(p) for p in pairs[:n_train]], [record(p) for p in pairs[n_train:]]


def write_jsonl(path: str, records: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for item in records:
            handle.write(json.dumps(item) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("examples", "data"), help="output folder")
    parser.add_argument("--train", type=int, default=3000, help="training examples")
    parser.add_argument("--eval", type=int, default=200, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held_out = make_records(args.train, args.eval, seed=args.seed)
    write_jsonl(os.path.join(args.out, "reverse_train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "reverse_eval.jsonl"), held_out)
    print(f"wrote {len(train)} + {len(held_out)} records to {args.out}")


if __name__ == "__main__":
    main()
