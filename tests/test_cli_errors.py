"""Every user mistake through the real command: exit 2, exactly one line on stderr, no traceback, and
nothing on disk changed. Most of these answer before torch is imported, so each subprocess is short."""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsft.demo_data import make_records, write_jsonl

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"


def run_cli(args, cwd, **env):
    environ = dict(os.environ, FASTSFT_TRITON_ON_CPU="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastsft", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)
    return proc, time.perf_counter() - started


def tree(folder):
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A config, its data, and a finished run in out/ (trained once, in this process)."""
    root = tmp_path_factory.mktemp("project")
    train, held_out = make_records(16, 4, seed=3)
    write_jsonl(str(root / "train.jsonl"), train)
    (root / "run.yaml").write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: 2\nsave_steps: 2\nprogress_bar: 'off'\nmode: lora\n"
        f"lora_r: 4\noutput_dir: out\n")
    from fastsft.cli import main

    # this one training run on the reference path; restored after, so later tests in this worker
    # keep the suite's interpreter setting
    old = os.environ.get("FASTSFT_TRITON_ON_CPU")
    os.environ["FASTSFT_TRITON_ON_CPU"] = "0"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "run.yaml"]) == 0
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("FASTSFT_TRITON_ON_CPU", None)
        else:
            os.environ["FASTSFT_TRITON_ON_CPU"] = old
    (root / "a_file").write_text("not a folder")
    (root / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (root / "missing_field.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    (root / "bot.jsonl").write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    (root / "empty.csv").write_text("")
    return root


CASES = [
    # (name, args, expected text in the one line)
    ("finished run", ["train", "run.yaml"], "holds a finished run (2 steps): pass --overwrite"),
    ("changed config on resume", ["train", "run.yaml", "--resume", "--learning_rate", "0.1"],
     "differs from the checkpoint's (learning_rate: 0.0002 -> 0.1)"),
    ("output_dir a file", ["train", "run.yaml", "--output_dir", "a_file"], "is a file, not a directory"),
    ("output_dir under a file", ["train", "run.yaml", "--output_dir", "a_file/run"], "which is a file"),
    ("missing local model", ["train", "run.yaml", "--model", "./models/none", "--model_config", "{}",
                             "--output_dir", "o"], "'./models/none': no such file or directory"),
    ("hub model offline", ["train", "run.yaml", "--model", "someone/model", "--model_config", "{}",
                           "--output_dir", "o"], "HF_HUB_OFFLINE=1 forbids downloading it"),
    ("non-UTF-8 data", ["train", "run.yaml", "--dataset", "latin1.jsonl", "--output_dir", "o"],
     "latin1.jsonl, line 2: not UTF-8 text (byte offset 28:"),
    ("missing field", ["train", "run.yaml", "--dataset", "missing_field.jsonl", "--output_dir", "o"],
     "missing_field.jsonl, line 3: missing field 'completion'"),
    ("unknown role", ["train", "run.yaml", "--dataset", "bot.jsonl", "--output_dir", "o"],
     "line 1: field 'messages[0].role' is 'bot', expected one of system, developer, user, assistant"),
    ("empty csv", ["train", "run.yaml", "--dataset", "empty.csv", "--output_dir", "o"], "no examples"),
    ("path without extension", ["train", "run.yaml", "--dataset", "train", "--output_dir", "o"],
     "'train' is not a local path and not in the hub cache"),
    ("ratio", ["train", "run.yaml", "--warmup_ratio", "2"], "'warmup_ratio' must be in [0, 1], got 2.0"),
    ("two spellings", ["train", "run.yaml", "--max_length", "64", "--max_seq_length", "64"], "both set"),
    ("lora_dropout", ["train", "run.yaml", "--lora_dropout", "1.5"], "'lora_dropout' must be in [0, 1), got 1.5"),
    ("use_dora in full mode", ["train", "run.yaml", "--mode", "full", "--use_dora", "true"],
     "'use_dora' applies to mode lora or qlora"),
    # found after torch + transformers load, still before anything is written
    ("model_config key", ["train", "run.yaml", "--output_dir", "o", "--model_config", "{hidden_sise: 32}"],
     "'hidden_sise' is not a field of LlamaConfig; did you mean 'hidden_size'?"),
    ("LoRA target", ["train", "run.yaml", "--overwrite", "--lora_target_modules", "nope"],
     "Target modules nope not found"),
    ("merge into a file", ["merge", "--adapter", "out", "--output", "a_file"], "--output"),
    ("merge into a run", ["merge", "--adapter", "out", "--output", "out"], "is not empty: pass --overwrite"),
]


@pytest.mark.parametrize("name, args, expected", CASES, ids=[c[0] for c in CASES])
def test_one_line_exit_2_nothing_changed(project, name, args, expected):
    before = tree(project)
    proc, seconds = run_cli(args, project)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]
    assert tree(project) == before  # nothing written, nothing lost
    assert "torch" not in proc.stdout


def test_checks_answer_before_the_heavy_imports(project):
    """A data error costs the interpreter start and the check, not torch + transformers (~10 s)."""
    code = ("import sys, runpy; sys.argv = ['fastsft', 'train', 'run.yaml', '--dataset', 'bot.jsonl', "
            "'--output_dir', 'o']\ntry:\n    runpy.run_module('fastsft', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr


def test_no_network_fails_within_a_second(project, monkeypatch):
    from fastsft.errors import ConfigError
    from fastsft.sources import check_model_source

    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(project / "empty_hf_home"))
    silent = socket.socket()  # accepts connections (the backlog) and never answers: a hung network
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        for endpoint in (f"http://127.0.0.1:{silent.getsockname()[1]}", "http://127.0.0.1:9", "https://hub.invalid"):
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
            started = time.perf_counter()
            with pytest.raises(ConfigError, match=r"the hub \(.*\) cannot be reached \(no network\?\)"):
                check_model_source("someone/model")
            assert time.perf_counter() - started < 1.5, endpoint
    finally:
        silent.close()


def test_read_only_output_dir(project, monkeypatch):
    from fastsft.errors import ConfigError
    from fastsft.preflight import check_writable

    folder = project / "read_only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root writes anyway: stand in a refusing filesystem
            import tempfile

            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
        with pytest.raises(ConfigError, match=r"read_only/run'?: cannot write in .*read_only'? \(Permission denied\)"):
            check_writable(str(folder / "run"))
    finally:
        folder.chmod(0o755)


def test_version_and_generated_help(project):
    proc, _ = run_cli(["--version"], project)
    assert proc.returncode == 0 and proc.stdout.startswith("fastsft 0.")
    proc, _ = run_cli(["train", "--help"], project)
    assert proc.returncode == 0
    assert "--learning_rate (float, default 0.0002)\n      peak learning rate" in proc.stdout
    assert "num_train_epochs = num_epochs" in proc.stdout


def test_resume_a_run_folder_without_its_config(project, tmp_path, monkeypatch, capsys):
    """fastsft train --resume DIR (no CONFIG.yaml): the checkpoint's saved config, from any directory."""
    import shutil

    from fastsft.cli import main

    run = tmp_path / "moved_run"
    shutil.copytree(project / "out", run)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(run), "--max_steps", "3"]) == 0  # output_dir: the moved folder
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoints' / 'step-2'} at step 2" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
