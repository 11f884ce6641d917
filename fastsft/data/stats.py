"""DataStats: what preparation kept, cut and dropped, and how long the examples are."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fastsft.data.example import Example

PERCENTILES = (50, 90, 99)


@dataclass
class DataStats:
    """Counts for one split. `trained_tokens` counts labels trained after the shift."""

    split: str = "train"
    format: str = ""
    loaded: int = 0
    kept: int = 0
    truncated: int = 0  # cut to max_seq_length (the first tokens are kept), including those then dropped
    truncated_no_trained_tokens: int = 0  # of those, cut to no trained token and dropped
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    lengths: dict = field(default_factory=dict)  # min, p50, p90, p99, max, mean of kept lengths
    cache_hit: bool = False
    # dropped or suspicious examples: [{"reason", "count", "where": the first lines, "source"}]
    flagged: list = field(default_factory=list)

    @classmethod
    def from_examples(cls, examples: list[Example], **counts) -> "DataStats":
        stats = cls(**counts)
        stats.kept = len(examples)
        lengths = np.asarray([len(e) for e in examples], dtype=np.int64)
        stats.total_tokens = int(lengths.sum())
        stats.trained_tokens = sum(e.num_trained_tokens for e in examples)
        if len(lengths):
            stats.lengths = {"min": int(lengths.min())}
            for p in PERCENTILES:
                stats.lengths[f"p{p}"] = float(np.percentile(lengths, p))
            stats.lengths["max"] = int(lengths.max())
            stats.lengths["mean"] = float(lengths.mean())
        return stats

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["trained_share"] = self.trained_share
        return out

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.split}: {self.kept} examples kept of {self.loaded} loaded (format {self.format})",
            f"  truncated {self.truncated}{self._truncated_detail()}, dropped {self.dropped_too_long} too long, "
            f"dropped {self.dropped_no_trained_tokens} with no trained token",
            f"  tokens {self.total_tokens}, trained {self.trained_tokens} ({100 * self.trained_share:.1f}%)",
        ]
        if self.lengths:
            parts = ", ".join(
                f"{name} {value:.0f}" if name != "mean" else f"mean {value:.1f}" for name, value in self.lengths.items()
            )
            lines.append(f"  lengths: {parts}")
        for entry in self.flagged:
            more = ", ..." if entry["count"] > len(entry["where"]) else ""
            lines.append(f"  {entry['count']} example{'s' if entry['count'] != 1 else ''} {entry['reason']} "
                         f"({entry['source']}: {', '.join(entry['where'])}{more})")
        if self.cache_hit:
            lines.append("  (tokenised data reused from the cache)")
        return lines

    def _truncated_detail(self) -> str:
        if not self.truncated_no_trained_tokens:
            return ""
        return f" ({self.truncated_no_trained_tokens} of them left with no trained token, dropped)"

    @classmethod
    def from_dict(cls, data: dict) -> "DataStats":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**data)
