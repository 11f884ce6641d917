"""Issue 25 end to end on the tiny model: eval_metrics and the forgetting probe in a training run, their
gates, `fastsft eval` on a saved model, and the bad inputs that stop a run before training (exit 2)."""
import json

import pytest

from fastsft.cli import main

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py

METRIC_FILE = ("def words(prompt, reply, reference):\n"
               "    return float(len(reply.split()))\n"
               "def boom(prompt, reply, reference):\n"
               "    if 'number 3' in reference:\n"
               "        raise ValueError('cannot score')\n"
               "    return 1.0\n"
               "def text(prompt, reply, reference):\n"
               "    return 'high'\n"
               "def strict(prompt, reply, reference):\n"
               "    if reply != reference:\n"
               "        raise KeyError('unexpected reply')\n"
               "    return 1.0\n")


def _chat(k):
    return {"messages": [{"role": "user", "content": f"question {k}"},
                         {"role": "assistant", "content": f"answer number {k} " * (1 + k % 3)}]}


def _config(tmp_path, extra="", name="run.yaml", n=16, fraction=0.25):
    with open(tmp_path / "train.jsonl", "w") as f:
        for k in range(n):
            f.write(json.dumps(_chat(k)) + "\n")
    with open(tmp_path / "general.jsonl", "w") as f:
        for k in range(6):
            f.write(json.dumps({"text": f"The river {k} flows past the old mill towards the sea."}) + "\n")
    (tmp_path / "my_metrics.py").write_text(METRIC_FILE)
    path = tmp_path / name
    path.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"learning_rate: 0.05\neval_fraction: {fraction}\neval_max_new_tokens: 8\nseed: 3\n"
        f"output_dir: {tmp_path / 'out'}\n{extra}")
    return str(path)


METRICS = ("eval_metrics: [exact_match, contains, {regex: 'number', name: says_number}, json, "
           "{python: 'my_metrics:words'}]\n")


def _evals(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("type") == "eval"]


def test_run_with_metrics_forgetting_and_a_failing_gate(tmp_path, capsys):
    config = _config(tmp_path, METRICS + "forgetting_dataset: general.jsonl\neval_steps: 1\nreport_to: tensorboard\n"
                     "gates: {contains: {min: 2.0}, forgetting: {max: 1000}, eval_words: {min: 0}}\n")
    assert main(["train", config]) == 3
    err = capsys.readouterr().err
    assert "gate contains:" in err and "< min 2" in err and "gate forgetting" not in err
    out = tmp_path / "out"
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        for key in ("eval_loss", "eval_exact_match", "eval_contains", "eval_says_number", "eval_json", "eval_words",
                    "eval_forgetting_loss", "eval_forgetting"):
            assert isinstance(e[key], float), key
        assert e["eval_examples"] == 4 and 0 <= e["eval_contains"] <= 1
    assert evals[0]["eval_forgetting"] == 0.0  # step 0 is the baseline
    assert evals[2]["eval_forgetting"] == pytest.approx(
        evals[2]["eval_forgetting_loss"] / evals[0]["eval_forgetting_loss"] - 1)
    assert evals[2]["eval_forgetting_loss"] != evals[0]["eval_forgetting_loss"]  # lr 0.05 moved the model
    assert "forgetting" in err and "eval @ step 2: loss" in err and "contains" in err
    rows = [json.loads(line) for line in (out / "eval_worst.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["step"] == 2 and set(r["scores"]) == {"exact_match", "contains", "says_number",
                                                                         "json", "words"} for r in rows)
    firsts = [r["scores"]["exact_match"] for r in rows]
    assert firsts == sorted(firsts)  # worst first, by the first metric
    assert "| # | exact_match | contains |" in (out / "eval_worst.md").read_text()
    manifest = json.loads((out / ".fastsft-manifest.json").read_text())
    assert "eval_worst.md" in manifest and "eval_worst.jsonl" in manifest
    assert "gate contains" in (out / "GATE_FAILED").read_text() and "GATE_FAILED" in manifest
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    tags = board.Tags()["scalars"]
    assert {"eval/eval_contains", "eval/eval_words", "eval/eval_forgetting"} <= set(tags)
    assert [e.value for e in board.Scalars("eval/eval_contains")] == pytest.approx([e["eval_contains"] for e in evals])


def test_forgetting_gate_and_baseline_without_eval_at_start(tmp_path, capsys):
    config = _config(tmp_path, "forgetting_dataset: general.jsonl\neval_at_start: false\n"
                     "gates: {forgetting: {max: -1.0}}\n", fraction=0)
    assert main(["train", config]) == 3  # a relative increase is always > -1: the gate must fail
    err = capsys.readouterr().err
    assert "forgetting probe @ step 0 (baseline)" in err and "gate forgetting:" in err and "> max -1" in err
    evals = _evals(tmp_path / "out")
    assert [e["step"] for e in evals] == [0, 2] and "eval_loss" not in evals[0]
    assert isinstance(evals[1]["eval_forgetting"], float)


@pytest.mark.parametrize("extra, message", [
    ("eval_metrics: [{python: 'my_metrics:boom'}]\n",
     "python metric my_metrics:boom raised on eval example"),
    ("eval_metrics: [{python: 'my_metrics:text'}]\n",
     "python metric my_metrics:text returned 'high' for eval example 0; it must return a finite number"),
    ("eval_metrics: [{regex: '[a-'}]\n", "eval_metrics[1]: regex '[a-' does not compile"),
    ("eval_metrics: [{json: {schema: {type: nothing}}}]\n", "eval_metrics[1]: the JSON schema is not valid"),
    ("eval_metrics: [bleu]\n", "unknown metric 'bleu'; known: exact_match, contains, regex, json, python"),
    ("gates: {json: {min: 1}}\n", "gates: unknown metric 'json'; known: eval_loss, exact_match, forgetting"),
    ("forgetting_dataset: missing.jsonl\n", "missing.jsonl"),
])
def test_bad_input_exits_2_before_training(tmp_path, capsys, extra, message):
    n = 40 if "boom" in extra else 16  # enough held-out examples that 'number 3' is among them
    config = _config(tmp_path, extra, n=n)
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_fastsft_eval_on_saved_models(tmp_path, capsys):
    config = _config(tmp_path, METRICS + "forgetting_dataset: general.jsonl\nsave_steps: 1\neval_steps: 1\n")
    assert main(["train", config]) == 0
    out = tmp_path / "out"
    train_final = _evals(out)[-1]
    # a checkpoint is an adapter folder too: its numbers are the run's eval at that step
    assert main(["eval", config, "--model", str(out / "checkpoints" / "step-1"), "--output",
                 str(tmp_path / "step1.json")]) == 0
    step1 = json.loads((tmp_path / "step1.json").read_text())
    assert step1["eval_loss"] == pytest.approx(_evals(out)[1]["eval_loss"], rel=1e-4)
    capsys.readouterr()
    # the adapter folder: the same numbers as the run's final eval; forgetting against the adapter switched off
    assert main(["eval", config, "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "eval_results.json").read_text())
    assert results["kind"] == "adapter" and results["gates"] == {"passed": True, "failures": []}
    assert results["eval_loss"] == pytest.approx(train_final["eval_loss"], rel=1e-4)
    assert results["contains"] == pytest.approx(train_final["eval_contains"])
    assert results["forgetting_loss"] == pytest.approx(train_final["eval_forgetting_loss"], rel=1e-4)
    assert results["forgetting"] == pytest.approx(train_final["eval_forgetting"], rel=1e-3, abs=1e-6)
    assert "eval of" in printed and "results written to" in printed
    # a failed gate: exit 3, the folder marked; then a merged (full) model passes and is not marked
    failing = _config(tmp_path, METRICS + "forgetting_dataset: general.jsonl\n"
                      "gates: {eval_loss: {max: 0.0001}, says_number: {min: 0}}\n", name="gated.yaml")
    report = tmp_path / "report" / "r.json"
    assert main(["eval", failing, "--model", str(out), "--output", str(report)]) == 3
    err = capsys.readouterr().err
    assert "gate eval_loss:" in err and "gate says_number" not in err and (out / "GATE_FAILED").is_file()
    assert json.loads(report.read_text())["gates"]["passed"] is False
    assert (tmp_path / "report" / "eval_worst.md").is_file()
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    assert main(["eval", config, "--model", str(merged), "--base", str(out / "base_model")]) == 0
    merged_results = json.loads((merged / "eval_results.json").read_text())
    assert merged_results["kind"] == "full"
    assert merged_results["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-3)
    assert merged_results["forgetting"] == pytest.approx(results["forgetting"], rel=1e-2, abs=1e-4)


def test_fastsft_eval_bad_input(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["eval", config, "--model", str(tmp_path)]) == 2
    assert "holds neither adapter_config.json nor config.json" in capsys.readouterr().err
    assert main(["eval", config]) == 2
    assert "usage: fastsft eval CONFIG.yaml --model DIR" in capsys.readouterr().err


def test_python_metric_failing_on_a_generated_reply_stops_with_one_line(tmp_path, capsys):
    # the check before training passes (reference == reply); the untrained model's reply differs at step 0
    config = _config(tmp_path, "eval_metrics: [{python: 'my_metrics:strict'}]\n")
    assert main(["train", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastsft train: config error: python metric my_metrics:strict raised on eval example ")
    assert "KeyError" in err[-1] and not any("Traceback" in line for line in err)
    assert main(["train", config, "--eval_metrics", "[contains]", "--overwrite"]) == 0


def test_forgetting_baseline_survives_resume(tmp_path, capsys):
    config = _config(tmp_path, "forgetting_dataset: general.jsonl\nsave_steps: 1\nmax_steps: 1\n")
    text = open(config).read().replace("max_steps: 2\n", "")
    open(config, "w").write(text)
    assert main(["train", config]) == 0
    assert main(["train", config, "--max_steps", "3", "--resume"]) == 0
    evals = _evals(tmp_path / "out")
    assert [e["step"] for e in evals] == [0, 1, 3]
    base = evals[0]["eval_forgetting_loss"]
    assert evals[2]["eval_forgetting"] == pytest.approx(evals[2]["eval_forgetting_loss"] / base - 1)


def test_overwrite_clears_a_stale_gate_marker(tmp_path, capsys):
    assert main(["train", _config(tmp_path, "gates: {eval_loss: {max: 0.0001}}\n")]) == 3
    assert (tmp_path / "out" / "GATE_FAILED").is_file()
    assert main(["train", _config(tmp_path), "--overwrite"]) == 0  # no gates this time: nothing re-checks
    assert not (tmp_path / "out" / "GATE_FAILED").exists()


def test_fastsft_eval_loads_a_qlora_adapter_on_its_4bit_base(tmp_path, capsys):
    config = _config(tmp_path, "eval_metrics: [contains]\nforgetting_dataset: general.jsonl\n")
    # hidden sizes of whole 4-bit blocks (64): bitsandbytes' own CPU forward (the adapter switched off) needs them
    text = open(config).read().replace("mode: lora", "mode: qlora").replace(TINY, TINY.replace("32", "64").replace(
        "intermediate_size: 64", "intermediate_size: 128"))
    open(config, "w").write(text)
    assert main(["train", config]) == 0
    final = _evals(tmp_path / "out")[-1]
    assert main(["eval", config, "--model", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
    # the baseline: the run's step 0 went through the fused NF4 LoRA path (B = 0), fastsft eval through
    # bitsandbytes' own forward with the adapter switched off; the two dequantize-and-matmul orders differ
    # by ~1e-5 in the loss ratio (measured 9e-6 here)
    assert results["forgetting"] == pytest.approx(final["eval_forgetting"], abs=5e-5)
