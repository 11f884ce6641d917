"""Example: one tokenised training document."""
from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class Example:
    """Token ids and labels of one document (same length; -100 = not trained).

    Labels are aligned with input_ids (the model shifts them), so labels[0] is never
    trained. `source_index` is the record's position in the loaded data.
    """

    input_ids: list[int]
    labels: list[int]
    source_index: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained_tokens(self) -> int:
        """Labels trained after the model's shift (labels[1:] != -100)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)
