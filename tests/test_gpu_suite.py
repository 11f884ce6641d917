"""The GPU suite: its --dry-run (every stage at smoke sizes on the CPU, so the suite cannot rot between GPU
leases), what it writes (five files, the 8-files-back limit), its budget and failure handling, and the
results it collects: every kernel benchmark's smoke case, the end-to-end smoke runs (fastsft against the hf
recipe on the same saved checkpoint, Unsloth skipped with its reason) and the README table rendered from
suite.json.

The dry run is the one test that runs the benchmarks' CLIs end to end (it replaces separate smoke runs
of each, which cost the same imports again and again).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_OPS = {"cross_entropy", "linear_cross_entropy", "lora_linear", "varlen_attention", "rms_norm", "rope",
              "swiglu"}
E2E_PROVIDERS = {"hf", "hf+liger", "hf-packed", "fastsft", "unsloth"}
OUT_FILES = {"suite.json", "summary.md", "kernels.png", "e2e.png", "suite.log"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_suite_test_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(module, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU rehearsal")
def test_dry_run_runs_every_stage_and_writes_five_files(tmp_path):
    out = tmp_path / "out"
    proc = _run("benchmarks.gpu_suite", "--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == OUT_FILES  # no folders: all of it comes back from a device
    report = json.loads((out / "suite.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["correctness", "sync_step", "kernels", "torch_compile", "e2e_qlora_8b", "e2e_full_1b",
                            "plan_check", "max_context", "unsloth"]
    for name, s in stages.items():
        assert s["status"] == "ok", (name, s)
    assert report["setup"][0]["status"] == "skipped (dry run)"
    assert report["peaks"] is None and report["environment"]["torch"]
    assert "sync_step qlora: ok" in stages["sync_step"]["commands"][0]["tail"]
    compiled = report["torch_compile"]["rows"]  # the smoke step: aot_eager on CPU, no graph break, same loss
    assert [r["mode"] for r in compiled] == ["qlora"] and compiled[0]["status"] == "ok", compiled
    assert compiled[0]["graph_breaks"] == 0 and compiled[0]["loss_rel_diff"] < 1e-5
    check_kernels(report["kernels"])
    check_e2e(report["e2e"])
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "Measured peaks: no GPU." in summary
    assert "| a correctness | 120 | ok |" in summary and "## Failures" not in summary
    # the Triton it ran with and the committed compile report for that version, beside the timings
    triton = report["environment"]["triton"]
    assert report["compile"]["triton"] == triton and report["compile"]["committed"]["compiles"] > 0
    assert report["compile"]["committed"]["source"].endswith(f"triton-{'.'.join(triton.split('.')[:2])}.json")
    assert f"## Compile report (triton {triton})" in summary
    check_render_table(out / "suite.json", tmp_path)


def check_kernels(payloads):
    by_op = {p["benchmark"]: p for p in payloads}
    assert set(by_op) == KERNEL_OPS
    for op, p in by_op.items():
        assert p["smoke"] is True
        rows = {r["provider"]: r for r in p["results"]}
        assert rows["fastsft"].get("ms") and not rows["fastsft"].get("error"), (op, rows["fastsft"])
        assert not [r for r in p["results"] if r.get("error")], op
    lce = {r["provider"]: r for r in by_op["linear_cross_entropy"]["results"]}
    for name in ("cce", "cce_exact"):
        assert "CUDA" in lce[name]["extra"]["skipped"] or "not importable" in lce[name]["extra"]["skipped"]


def check_e2e(payloads):
    by_name = {p["benchmark"]: p for p in payloads}
    assert set(by_name) == {"e2e_tiny-llama_qlora_seq256", "e2e_tiny-llama_full_seq256",
                            "e2e_tiny-llama_qlora_max_context"}
    for name in ("e2e_tiny-llama_qlora_seq256", "e2e_tiny-llama_full_seq256"):
        payload = by_name[name]
        assert payload["kind"] == "throughput" and payload["smoke"] is True
        assert "flops_formula" in payload["config"] and "unsloth" in payload["config"]["providers"]
        rows = {r["provider"]: r for r in payload["results"]}
        ran = [rows["fastsft"]] + ([rows["hf"]] if "qlora" in name else [])  # the dry run's stage e: fastsft
        for r in ran:
            assert not r.get("error") and not r.get("skipped"), r
            assert r["tokens_per_s"] > 0 and 0 < r["trained_tokens_per_s"] < r["tokens_per_s"], r
            assert r["checkpointing_effective"] is True and len(r["step_ms"]) == 2
            assert r["versions"]["transformers"] and r["versions"]["torch"]
        fast = rows["fastsft"]
        assert fast["fastsft_patched"] and "load_model" in fast["builder"] and fast["batch_format"] == "packed"
        for name_ in ("hf+liger",) + (("hf-packed",) if "qlora" in name else ()):
            assert len(rows[name_]["skipped"]) > 10
    rows = {r["provider"]: r for r in by_name["e2e_tiny-llama_qlora_seq256"]["results"]}
    hf, fast = rows["hf"], rows["fastsft"]
    # one saved checkpoint, the same documents: the same work and (fp32, reference ops) the same losses
    assert hf["data_fingerprint"] == fast["data_fingerprint"]
    assert hf["trained_tokens_per_step"] == fast["trained_tokens_per_step"] and hf["docs_per_step"] > 1
    assert hf["batch_format"] == "padded"
    torch.testing.assert_close(torch.tensor(fast["losses"]), torch.tensor(hf["losses"]), rtol=1e-4, atol=1e-5)
    assert abs(fast["speedup_vs_hf"] - hf["ms"] / fast["ms"]) < 1e-9
    qlora = {r["provider"]: r for r in by_name["e2e_tiny-llama_qlora_seq256"]["results"]}
    # the Unsloth stage's row is merged into stage d's table, skipped on the CPU with its reason
    assert set(qlora) == E2E_PROVIDERS and "CUDA" in qlora["unsloth"]["skipped"]
    mc = {(r["provider"], r["mode"]): r for r in by_name["e2e_tiny-llama_qlora_max_context"]["results"]}
    assert set(mc) == {("fastsft", "ckpt"), ("fastsft", "ckpt+offload")}
    for r in mc.values():
        # nothing runs out of memory on a CPU: the search doubles up to the smoke cap
        assert r["max_seq"] == 128 and r["stopped_by"] == "cap" and r["checkpointing_effective"] is True, r


def check_render_table(suite_json, tmp_path):
    proc = _run("benchmarks.render_table", str(suite_json))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "| provider | trained tok/s |" in table and "longest trainable sequence" in table
    for name in E2E_PROVIDERS:
        assert f"| {name} |" in table
    assert "skipped: Unsloth needs a CUDA GPU" in table and "SMOKE RUN" in table
    render = _load("render_table")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{render.BEGIN}\nstale table\n{render.END}\nafter\n")
    proc = _run("benchmarks.render_table", str(suite_json), "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{render.END}\nafter\n")
    assert table.strip() in text
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no results block"):
        render.update_readme(str(readme), table)


# ---------------------------------------------------------------- budget, failures, merging (no subprocess
# beyond a one-line python)
suite_mod = _load("gpu_suite")


def _suite(tmp_path, budget):
    args = suite_mod.build_parser().parse_args(["--out", str(tmp_path / "out"), "--budget", str(budget),
                                                "--work", str(tmp_path / "work")])
    return suite_mod.Suite(args)


def test_a_stage_that_no_longer_fits_is_skipped_and_said_so(tmp_path):
    suite = _suite(tmp_path, budget=20)
    stage = next(s for s in suite_mod.STAGES if s.name == "e2e_qlora_8b")
    suite.run_stage(stage, selected=True)
    record = suite.report["stages"][-1]
    assert record["status"].startswith("skipped (needs at least 90 s;") and record["commands"] == []
    suite.run_stage(suite_mod.STAGES[0], selected=False)
    assert suite.report["stages"][-1]["status"] == "skipped (not selected with --stages)"
    assert "| d e2e_qlora_8b | 150 | skipped (needs at least 90 s" in (tmp_path / "out" / "summary.md").read_text()


def test_failures_and_timeouts_are_listed_with_their_last_lines(tmp_path):
    suite = _suite(tmp_path, budget=100)
    py = sys.executable
    stage = suite_mod.Stage("x", "broken", 30, 1, "a failing and a hanging command", lambda s, b: [
        suite_mod.Command("fails", [py, "-c", "print('first line'); print('boom: the last line'); raise SystemExit(3)"]),
        suite_mod.Command("hangs", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                          slice_s=2),
    ])
    suite.run_stage(stage, selected=True)
    record = suite.report["stages"][-1]
    assert record["status"] == "failed: fails, hangs"
    statuses = [c["status"] for c in record["commands"]]
    assert statuses == ["failed (exit 3)", "timed out"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Failures" in summary and "boom: the last line" in summary and "started" in summary
    assert "===== hangs (rc None, timed out" in (tmp_path / "out" / "suite.log").read_text()


def test_unsloth_rows_join_stage_d_with_ratios_to_its_hf_row():
    d = {"benchmark": "e2e_m_qlora_seq4096", "kind": "throughput", "results": [
        {"provider": "hf", "ms": 200.0, "peak_mb": 1000.0}, {"provider": "fastsft", "ms": 100.0, "peak_mb": 400.0}]}
    u = {"benchmark": "e2e_m_qlora_seq4096", "kind": "throughput", "environment": {"unsloth": "x"}, "results": [
        {"provider": "unsloth", "ms": 150.0, "peak_mb": 500.0}]}
    [merged] = suite_mod.merge_e2e([d], [u])
    rows = {r["provider"]: r for r in merged["results"]}
    assert set(rows) == {"hf", "fastsft", "unsloth"}
    assert rows["unsloth"]["speedup_vs_hf"] == pytest.approx(200 / 150)
    assert rows["unsloth"]["memory_vs_hf"] == pytest.approx(0.5)


def test_unknown_stage_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        suite_mod.main(["--out", "unused", "--stages", "a,zz"])
    assert exc.value.code == 2


def test_the_compile_report_for_the_running_triton_sits_beside_the_timings(tmp_path):
    """Setup attaches the committed sweep of the Triton the run imports; stage c's own report joins it."""
    record = suite_mod.compile_record("3.6.0")
    committed = record["committed"]
    assert record["triton"] == "3.6.0" and committed["source"] == os.path.join(
        "benchmarks", "results", "compile", "triton-3.6.json")
    assert committed["triton"].startswith("3.6") and committed["full"] and committed["compiles"] > 300
    assert committed["failing"] == [] and committed["tile_notes"]  # 3.6 picks some tiles of its own
    missing = suite_mod.compile_record("3.99.0")["committed"]
    assert missing["source"].startswith("none: no benchmarks/results/compile/triton-3.99.json")

    suite = _suite(tmp_path, budget=100)
    suite.report["compile"] = record
    with open(os.path.join(REPO, "benchmarks", "results", "compile", "triton-3.6.json")) as f:
        this_run = json.load(f)
    this_run["rows"] = this_run["rows"][:3]
    this_run["rows"][0] = dict(this_run["rows"][0], spill_stores=99, spill_budget=0)
    os.makedirs(suite.work, exist_ok=True)
    with open(os.path.join(suite.work, "compile_report.json"), "w") as f:
        json.dump(this_run, f)
    suite.collect()
    suite.flush()
    assert suite.report["compile"]["this_run"]["compiles"] == 3
    assert len(suite.report["compile"]["this_run"]["failing"]) == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Compile report (triton 3.6.0)" in summary
    assert "benchmarks/results/compile/triton-3.6.json (triton 3.6" in summary and "0 failing" in summary
    assert "this run (stage c, representative set)" in summary and "1 failing" in summary
    assert "  - FAIL " in summary and "spills 99 bytes (budget 0)" in summary
