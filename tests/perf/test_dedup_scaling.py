"""Issue 25: duplicate search stays near-linear (MinHash LSH), so a few thousand examples take seconds.

The proof a CPU can give: the number of exact Jaccard comparisons grows with the candidates LSH returns,
not with the n^2/2 pairs; plus a generous wall-clock bound (CPU-measured, shared machine).
"""
import random
import time

from fastsft.data import dedup


def test_candidates_not_pairs(monkeypatch):
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(3000)]
    train = [dedup.Text(" ".join(rng.choices(vocabulary, k=50)), f"train {i}") for i in range(3000)]
    held = [dedup.Text(" ".join(rng.choices(vocabulary, k=50)), f"eval {i}") for i in range(300)]
    train.append(dedup.Text(train[17].text, "planted"))
    calls = []
    exact = dedup.jaccard
    monkeypatch.setattr(dedup, "jaccard", lambda a, b: calls.append(1) or exact(a, b))
    started = time.perf_counter()
    report = dedup.find_duplicates(train, held, 0.85)
    elapsed = time.perf_counter() - started
    assert [(p["duplicate"], p["of"]) for p in report.pairs] == [("planted", "train 17")]
    # 3,001 x 3,000 / 2 + 3,001 x 300 = 5.4 million pairs; LSH hands over (almost) none of the unrelated ones
    assert len(calls) < 300, len(calls)
    assert elapsed < 30, f"{elapsed:.1f} s for 3,301 examples (CPU)"  # about 1 s here, alone on the machine
