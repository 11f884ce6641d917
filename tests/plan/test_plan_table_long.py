"""benchmarks/plan_table.py's long-context rows (issue 22): the table states the host memory, the
per-token cost and each target as met or as the gap, and renders from the JSON alone (--render-only)."""
import importlib.util
import json
import os

from .test_plan import REPO


def _plan_table():
    spec = importlib.util.spec_from_file_location("_plan_table", os.path.join(REPO, "benchmarks", "plan_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_context_rows_render_from_json(tmp_path):
    pt = _plan_table()
    gib = 2 ** 30
    row = {"label": pt.LONG_LABEL, "step": {"peak_bytes": 8 * gib}, "max_context": {"24GB": 190000, "40GB": 400000,
           "80GB": 600000}, "host_bytes": {"24GB": 50 * gib, "40GB": 100 * gib, "80GB": 238 * gib},
           "per_token_bytes": {"24GB": 79053.0, "80GB": 79053.0}}
    report = {"label": pt.LABEL, "margin": "m", "fastsft_note": None,
              "cases": [{"name": "Llama", "config": "x", "rows": [row]}],
              "long_context": [{"name": "Llama", "config": "x", "targets": {"24GB": 157000, "80GB": 685000},
                                "row": row}]}
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan_table.json").write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{pt.BEGIN}\nold\n{pt.END}\n")
    assert pt.main(["--render-only", "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "| Llama | 24GB | 190,000 | 50 | 77.2 KiB | 157,000 | met |" in text
    assert "| Llama | 80GB | 600,000 | 238 | 77.2 KiB | 685,000 | gap 85,000 |" in text
    assert "traced on CPU, not measured on a GPU" in text and (out / "plan_table.png").stat().st_size > 1000
