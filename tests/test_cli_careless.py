"""Issue 21: what a careless user loses or trains silently, each case through the CLI's main().

A run owns its folder (lock, manifest, --overwrite deletes only fastsft's files); a full disk and a
damaged checkpoint are one line; values no one means are refused; data dropped is counted with its lines.
"""
import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from fastsft import run_dir
from fastsft.cli import main
from fastsft.demo_data import make_records, write_jsonl

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"

pytestmark = pytest.mark.usefixtures("reference_ops")  # tests/conftest.py


def small_config(tmp_path, extra="", steps=2):
    if not (tmp_path / "train.jsonl").exists():
        train, _ = make_records(24, 1, seed=2)
        write_jsonl(str(tmp_path / "train.jsonl"), train)
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: tiny-llama\nmodel_config: {TINY}\ntokenizer_vocab_size: 300\ndataset: train.jsonl\n"
        f"max_seq_length: 64\nbatch_tokens: 128\nmax_steps: {steps}\nprogress_bar: 'off'\nmode: lora\nlora_r: 4\n"
        f"output_dir: {tmp_path / 'out'}\n{extra}"
    )
    return str(path)


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("fastsft train:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- 1. a run owns its folder
def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    config = small_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # a live other process (this test's parent shell stands in for it) holds the lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / run_dir.LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        assert main(["train", config]) == 2
        line = one_error_line(capsys)
        assert "in use by another run" in line and f"pid {other.pid}" in line
        assert sorted(os.listdir(out)) == [run_dir.LOCK_FILE]  # nothing written
    finally:
        other.kill()
        other.wait()
    # the other run is gone: its stale lock is taken over with one line, and released at the end
    assert main(["train", config]) == 0
    assert "took over the lock" in capsys.readouterr().err
    assert not (out / run_dir.LOCK_FILE).exists()


def test_foreign_files_are_refused_kept_and_never_replaced(tmp_path, capsys):
    config = small_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", config]) == 2
    line = one_error_line(capsys)
    assert "notes.txt" in line and "did not write" in line
    # --overwrite writes next to them and keeps them
    assert main(["train", config, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    # a file of fastsft's names the user put there is never replaced, even with --overwrite
    (out / "config.json").write_text('{"mine": 1}')
    assert main(["train", config, "--overwrite"]) == 2
    assert "config.json" in one_error_line(capsys)
    os.remove(out / "config.json")
    # --overwrite removes exactly what fastsft wrote
    written = run_dir.manifest(str(out))
    assert "adapter_model.safetensors" in written and "notes.txt" not in written
    capsys.readouterr()
    assert main(["train", config, "--overwrite"]) == 0
    assert "kept 1 it did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_user_readme_is_not_replaced_by_the_model_card(tmp_path, capsys):
    config = small_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    assert main(["train", config]) == 2
    assert "README.md" in one_error_line(capsys)
    assert (out / "README.md").read_text() == "my notes"


# ---------------------------------------------------------------- 2. disk full, damaged checkpoints
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_good(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path, "save_steps: 1\n", steps=3)
    from fastsft.train import checkpoint as ckpt

    real_save = ckpt.torch.save
    calls = {"n": 0}

    def filling_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk fills up mid-write
            with open(path, "wb") as handle:
                handle.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 13824 vs 13716")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", filling_save)
    assert main(["train", config]) == 1
    line = one_error_line(capsys)
    assert "disk full" in line and "step-2" in line and "last good checkpoint" in line and "step-1" in line
    root = tmp_path / "out" / "checkpoints"
    assert sorted(os.listdir(root)) == ["step-1"]  # the partial .tmp-step-2 is gone
    assert not (tmp_path / "out" / run_dir.LOCK_FILE).exists()

    # ENOSPC itself names the cause
    calls["n"] = 0

    def enospc(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(ckpt.torch, "save", enospc)
    assert main(["train", config, "--overwrite"]) == 1
    assert "No space left on device" in one_error_line(capsys)


def test_too_little_free_space_stops_before_writing(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path, "save_steps: 1\n")
    from fastsft.train import checkpoint as ckpt

    usage = ckpt.shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert main(["train", config]) == 1
    line = one_error_line(capsys)
    assert "not enough space" in line and "MB free" in line and "needs about" in line
    assert not (tmp_path / "out" / "checkpoints").exists() or not os.listdir(tmp_path / "out" / "checkpoints")


def test_stale_tmp_folders_are_removed_at_start(tmp_path, capsys):
    config = small_config(tmp_path, "save_steps: 1\n")
    assert main(["train", config]) == 0
    stale = tmp_path / "out" / "checkpoints" / ".tmp-step-7"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"x" * 1000)
    capsys.readouterr()
    assert main(["train", config, "--overwrite"]) == 0
    assert "removed 1 unfinished write" in capsys.readouterr().err
    assert not stale.exists()


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    config = small_config(tmp_path, "save_steps: 1\nsave_total_limit: 0\n")
    assert main(["train", config]) == 0
    state = tmp_path / "out" / "checkpoints" / "step-2" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:200])  # cut short
    capsys.readouterr()
    # named explicitly, the damaged checkpoint is refused in one line offering the intact one
    assert main(["train", config, "--resume", str(state.parent), "--max_steps", "3"]) == 2
    line = one_error_line(capsys)
    assert "training_state.pt" in line and "resume with --resume" in line and "step-1" in line
    # --resume alone takes the newest intact one by itself, with one line
    assert main(["train", config, "--resume", "--max_steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "step-2/training_state.pt is damaged" in err and "newest intact checkpoint" in err and "step-1" in err


# ---------------------------------------------------------------- 3. values no one means
@pytest.mark.parametrize("extra, expected", [
    ("learning_rate: .nan\n", "'learning_rate' must be a finite number"),
    ("max_grad_norm: .inf\n", "'max_grad_norm' must be a finite number"),
    ("learning_rate: 0\n", "allow_zero_lr"),
    ("lora_alpha: 0\n", "'lora_alpha' is 0"),
    ("max_steps: 3\nlora_r: 8\n", "lines 7 and 12 both set 'max_steps'"),
])
def test_values_no_one_means_are_refused_before_anything_is_written(tmp_path, capsys, extra, expected):
    config = small_config(tmp_path, extra)
    assert main(["train", config]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_nan_on_the_command_line_and_zero_lr_allowed(tmp_path, capsys):
    config = small_config(tmp_path)
    assert main(["train", config, "--learning_rate", "nan"]) == 2
    assert "finite" in one_error_line(capsys)
    assert main(["train", config, "--tokenizer_vocab_size", "5"]) == 2
    assert "'tokenizer_vocab_size' must be >= 260" in one_error_line(capsys)
    assert main(["train", config, "--learning_rate", "0", "--allow_zero_lr", "--max_steps", "1"]) == 0


def test_a_folder_without_a_data_file_is_refused(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello\n")
    config = small_config(tmp_path, f"dataset: {folder}\n")
    # the later dataset key would be a duplicate: write the config without the first one
    text = open(config).read().replace("dataset: train.jsonl\n", "")
    open(config, "w").write(text)
    assert main(["train", config]) == 2
    line = one_error_line(capsys)
    assert "holds no data file" in line and "notes.txt" in line


def test_dropped_and_suspicious_examples_are_counted_with_their_lines(tmp_path, capsys):
    train, _ = make_records(24, 1, seed=2)
    train[2]["messages"][-1]["content"] = ""  # line 3: an empty reply
    train[4]["messages"] = [m for m in train[4]["messages"] if m["role"] != "assistant"]  # line 5: no reply
    train[6]["messages"][0]["content"] = "word " * 400  # line 7: too long
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    with open(tmp_path / "train.jsonl", "a", encoding="utf-8") as handle:  # line 25: a 3 MB record
        handle.write(json.dumps({"messages": [{"role": "user", "content": "x" * (3 * 2**20)},
                                              {"role": "assistant", "content": "ok"}]}) + "\n")
    config = small_config(tmp_path, "truncation: drop\n")
    assert main(["train", config]) == 0
    err = capsys.readouterr().err
    assert "with an empty message content (kept)" in err and "line 3" in err
    assert "dropped with no assistant turn" in err and "line 5" in err
    assert "dropped as longer than max_seq_length 64 (" in err and "line 7" in err
    assert "skipped before tokenising, larger than 2 MB" in err and "line 25 (3.0 MB)" in err


# ---------------------------------------------------------------- 4. batch size and names as users mean them
AXOLOTL_QLORA = """\
base_model: tiny-llama
model_config: {tiny}
tokenizer_vocab_size: 300
is_llama_derived_model: true
strict: false
load_in_8bit: false
load_in_4bit: true
adapter: qlora
lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
lora_fan_in_fan_out: false
datasets:
  - path: train.jsonl
    type: chat_template
dataset_prepared_path: {cache}
val_set_size: 0.1
sequence_len: 64
sample_packing: true
pad_to_sequence_len: true
micro_batch_size: 2
gradient_accumulation_steps: 2
num_epochs: 1
max_steps: 2
optimizer: paged_adamw_8bit
lr_scheduler: cosine
cosine_min_lr_ratio: 0.1
learning_rate: 0.0002
train_on_inputs: false
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
flash_attention: true
warmup_steps: 1
evals_per_epoch: 0
saves_per_epoch: 0
deepspeed: deepspeed_configs/zero2.json
weight_decay: 0.0
wandb_project:
special_tokens:
output_dir: {out}
"""

TRL_SFT = """\
model_name_or_path: tiny-llama
model_config: {tiny}
tokenizer_vocab_size: 300
dataset: train.jsonl
output_dir: {out}
num_train_epochs: 1.5
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 2.0e-4
lr_scheduler_type: cosine_with_min_lr
optim: adamw_torch_fused
max_length: 64
packing: true
assistant_only_loss: true
logging_steps: 1
save_strategy: "no"
bf16: false
report_to: none
seed: 0
progress_bar: "off"
"""


def test_an_axolotl_qlora_config_lists_every_unsupported_key_at_once(tmp_path, capsys):
    small_config(tmp_path)  # writes train.jsonl
    path = tmp_path / "axolotl.yaml"
    path.write_text(AXOLOTL_QLORA.format(tiny=TINY, cache=tmp_path / "cache", out=tmp_path / "out"))
    assert main(["train", str(path)]) == 2
    line = one_error_line(capsys)
    # one line for all of them: the keys that change the run and that fastsft cannot honour
    for key in ("evals_per_epoch", "saves_per_epoch", "deepspeed"):
        assert repr(key) in line, key
    assert "flash_attention" not in line  # no effect in fastsft: accepted


def test_an_axolotl_qlora_config_trains_end_to_end(tmp_path, capsys):
    small_config(tmp_path)
    text = AXOLOTL_QLORA.format(tiny=TINY, cache=tmp_path / "cache", out=tmp_path / "out")
    for unsupported in ("evals_per_epoch: 0\n", "saves_per_epoch: 0\n", "deepspeed: deepspeed_configs/zero2.json\n"):
        text = text.replace(unsupported, "")
    path = tmp_path / "axolotl.yaml"
    path.write_text(text + "progress_bar: 'off'\n")
    # no GPU here: QLoRA's 4-bit base needs CUDA, so the same config runs as LoRA from the command line
    code = main(["train", str(path), "--mode", "lora", "--optimizer", "adamw_torch"])
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "micro_batch_size 2 x max_seq_length 64 = batch_tokens 128" in err
    assert "x 2 accumulation = up to 256 tokens per optimizer step" in err
    assert "ignored, with no effect in fastsft:" in err and "flash_attention" in err
    from fastsft.config import load_config

    config = load_config(str(path))
    assert (config.mode, config.optimizer, config.min_lr_ratio, config.cache_dir, config.eval_fraction) == (
        "qlora", "paged_adamw_8bit", 0.1, str(tmp_path / "cache"), 0.1)


def test_a_trl_sftconfig_yaml_trains_end_to_end(tmp_path, capsys):
    small_config(tmp_path)
    path = tmp_path / "trl.yaml"
    path.write_text(TRL_SFT.format(tiny=TINY, out=tmp_path / "out"))
    assert main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    assert "per_device_train_batch_size 2 x max_seq_length 64 = batch_tokens 128" in err
    from fastsft.config import load_config

    config = load_config(str(path))
    assert (config.num_epochs, config.optimizer, config.lr_scheduler, config.batch_tokens) == (
        1.5, "adamw", "cosine", 128)
    steps = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl") if '"train"' in line]
    assert 1.0 < steps[-1]["epoch"] <= 1.6  # one and a half epochs, not two


def test_errors_name_the_key_as_written_and_batch_tokens_wins_with_a_line(tmp_path, capsys):
    config = small_config(tmp_path, "val_set_size: 1.5\n")
    assert main(["train", config]) == 2
    assert "'val_set_size' (eval_fraction) must be in [0, 1)" in one_error_line(capsys)
    config = small_config(tmp_path, "per_device_train_batch_size: 8\n")  # batch_tokens: 128 is in the file too
    assert main(["train", config, "--max_steps", "1"]) == 0
    assert "batch_tokens 128 wins over per_device_train_batch_size 8" in capsys.readouterr().err


# ---------------------------------------------------------------- 5. threads and processes
def test_nproc_above_the_cores_is_refused_at_once(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path, "device: cpu\n")
    from fastsft.distributed import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: 2)
    assert main(["train", config, "--nproc", "64"]) == 2
    line = one_error_line(capsys)
    assert "--nproc 64" in line and "2 usable CPU cores" in line and "at most --nproc 2" in line
    assert not (tmp_path / "out").exists()


def test_more_processes_than_records_is_refused_before_workers_start(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path, "device: cpu\n")
    from fastsft.distributed import launch

    monkeypatch.setattr(launch, "usable_cores", lambda: 64)
    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("workers started"))
    assert main(["train", config, "--nproc", "32"]) == 2
    line = one_error_line(capsys)
    assert "32 processes" in line and "24 records" in line


def test_cpu_threads_default_is_printed_and_resume_command_keeps_nproc(tmp_path, capsys, monkeypatch):
    config = small_config(tmp_path)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert main(["train", config, "--max_steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "cpu threads: 1 (" in err and "load 5.0" in err
    from fastsft.train.loop import Trainer

    class Ranks:  # what a rank of an --nproc 2 run sees: torchrun's argv has no --nproc
        world_size = 2

    trainer = Trainer.__new__(Trainer)
    trainer.command, trainer.dist, trainer.output_dir = ["train", config, "--max_steps", "9"], Ranks(), "x"
    assert trainer.resume_command().endswith(f"train {config} --max_steps 9 --nproc 2 --resume")


# ---------------------------------------------------------------- 6. true logs and help
def test_jinja_syntax_error_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")
    config = small_config(tmp_path, "chat_template: chat.jinja\n")
    assert main(["train", config]) == 2
    line = one_error_line(capsys)
    assert "chat.jinja, line 2" in line and "example 0" not in line


def test_help_states_the_real_chat_template_default(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    entry = out[out.index("--chat_template"):].splitlines()[1]
    assert "the tokenizer's own" in entry and "default = fastsft's ChatML" not in entry


def test_attention_line_says_which_path_runs_and_slow_rates_keep_decimals(tmp_path, capsys, caplog):
    import logging

    from fastsft.train.metrics import rate, summary_lines

    config = small_config(tmp_path, "patch_kernels: true\n")
    with caplog.at_level(logging.INFO, logger="fastsft"):
        assert main(["train", config, "--max_steps", "1"]) == 0
    attention = [r.getMessage() for r in caplog.records if "fastsft_varlen" in r.getMessage()]
    assert attention and "PyTorch reference on CPU" in attention[0], attention
    assert rate(0.35) == "0.35" and rate(1234.4) == "1,234"
    assert "0.35" in "\n".join(summary_lines({"tokens_per_s": 0.35}))


def test_lora_summary_is_one_short_line_of_counts(tmp_path, caplog):
    import logging

    config = small_config(tmp_path, "patch_kernels: true\n")
    with caplog.at_level(logging.INFO, logger="fastsft"):
        assert main(["train", config, "--max_steps", "1"]) == 0
    lora = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.getMessage().startswith("lora:")]
    assert len(lora) == 1 and len(lora[0]) < 200, lora
    assert "groups fused" in lora[0] and "kept on peft's path" not in lora[0] and "base_model." not in lora[0]
