"""The early data check: every local source is read and every record converted before any heavy
import or any write, so a bad line answers in a second, naming the file and the 1-based line."""
from __future__ import annotations

import os
from typing import Iterator, NamedTuple, Optional

from fastsft.data.formats import records_to_samples
from fastsft.data.load import load_records
from fastsft.sources import check_data_source


class Source(NamedTuple):
    key: str  # the config key, for messages
    path: str
    split: str
    format: str
    text_field: str


def config_sources(config) -> Iterator[Source]:
    """The training and eval sources a TrainConfig names (dataset or datasets, and eval_dataset)."""
    if config.datasets:
        for n, entry in enumerate(config.datasets, start=1):
            yield Source(f"datasets[{n}]", entry["path"], entry.get("split", config.dataset_split),
                         entry.get("format", config.dataset_format), entry.get("text_field", config.dataset_text_field))
    elif config.dataset:
        yield Source("dataset", config.dataset, config.dataset_split, config.dataset_format, config.dataset_text_field)
    if config.eval_dataset:
        yield Source("eval_dataset", config.eval_dataset, config.dataset_split, config.dataset_format,
                     config.dataset_text_field)
    if getattr(config, "forgetting_dataset", None):  # issue 25: the forgetting probe's data (format detected)
        yield Source("forgetting_dataset", config.forgetting_dataset, "train", "auto", config.dataset_text_field)


def check_source(source: Source) -> Optional[int]:
    """Read and convert every record of a local source (the number of records); a hub name is only
    checked to be reachable (None)."""
    if not os.path.exists(os.path.expanduser(source.path)):
        check_data_source(source.path, key=f"config key {source.key!r}:")
        return None
    records = load_records(source.path, source.split)
    records_to_samples(records, list(range(len(records))), source.format, source.text_field)
    return len(records)


def check_config_data(config) -> Optional[int]:
    """Check every source; the number of training records (None when a hub source cannot tell)."""
    total: Optional[int] = 0
    for source in config_sources(config):
        count = check_source(source)
        if source.key not in ("eval_dataset", "forgetting_dataset"):
            total = None if count is None or total is None else total + count
    return total
