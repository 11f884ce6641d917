"""`fastsft export gguf SOURCE`: SOURCE is a merged model, a full run's output_dir, or an adapter (a LoRA / QLoRA
run's output_dir or checkpoint). An adapter is merged on the way (fastsft.train.merge: QLoRA into the exact
4-bit base training saw), into a temporary folder next to the output, which is removed afterwards."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Optional

from fastsft.errors import ConfigError

log = logging.getLogger("fastsft.export")
MERGE_DTYPES = ("fp32", "bf16", "fp16")


def _recorded_base(source: str) -> Optional[str]:
    with open(os.path.join(source, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle).get("base_model_name_or_path")


def export_gguf_from(source: str, out_path: str, qtype: str = "f16", *, overwrite: bool = False,
                     base: Optional[str] = None, base_weights: str = "exact", merge_dtype: str = "fp32") -> str:
    from fastsft.export.gguf_writer import check_request, export_gguf

    check_request(out_path, qtype, overwrite)  # before a merge that may take minutes
    if os.path.isfile(os.path.join(source, "adapter_config.json")):
        return _export_adapter(source, out_path, qtype, overwrite, base, base_weights, merge_dtype)
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise ConfigError(f"{source!r} holds neither config.json (a merged model or a full run) nor "
                          f"adapter_config.json (a LoRA / QLoRA run)")
    return export_gguf(source, out_path, qtype, overwrite)


def _export_adapter(source, out_path, qtype, overwrite, base, base_weights, merge_dtype) -> str:
    from fastsft.export.drift import drift_line
    from fastsft.export.gguf_writer import export_gguf
    from fastsft.sources import check_model_source
    from fastsft.train.merge import _base_path, merge_adapter

    if merge_dtype not in MERGE_DTYPES:
        raise ConfigError(f"--merge-dtype {merge_dtype!r} is not one of {', '.join(MERGE_DTYPES)}")
    base_path = _base_path(source, _recorded_base(source), base)  # one line when a local base is gone
    check_model_source(base_path, key="--base" if base else "the adapter's base model")
    parent = os.path.dirname(os.path.abspath(out_path))
    with tempfile.TemporaryDirectory(prefix=".fastsft-merge-", dir=parent) as scratch:
        merged = os.path.join(scratch, "merged")
        # fp32 by default: the GGUF type is then the only rounding the weights see
        report = merge_adapter(source, merged, dtype=merge_dtype, base=base_path, base_weights=base_weights)
        log.info("merged %s on the way (%s base weights, %s): %s", source, report["base_weights"],
                 report["dtype"], drift_line(report))
        return export_gguf(merged, out_path, qtype, overwrite)
