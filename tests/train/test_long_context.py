"""fastsft.train.long_context: the choice of MLP tiles, offload and loss chunk, and its checks.

``choose`` is driven by a breakdown built here (the shape the memory planner reports: fixed bytes
and peak bytes per token by component); ``apply`` by the free memory of the loaded model.
"""
import io
import math

import pytest
import torch

from fastsft.config import load_config
from fastsft.demo_data import make_records, write_jsonl
from fastsft.errors import ConfigError
from fastsft.patch import loss_chunk, tiled_mlp
from fastsft.train import Trainer, long_context
from fastsft.train.long_context import CHECKPOINTS, LOGITS, MLP, MemoryFigures

GIB = 2**30
# an 8B-like step: 10 GiB fixed; per token 200 KiB of MLP intermediates, 8 KiB x 32 layers of
# checkpoints, 250 KiB of logits, 60 KiB of everything else
FIGURES = MemoryFigures(capacity_bytes=24 * GIB, fixed_bytes=10 * GIB,
                        per_token_bytes={MLP: 200 * 1024, CHECKPOINTS: 256 * 1024, LOGITS: 250 * 1024,
                                         "attention": 40 * 1024, "rope": 20 * 1024})


def _choose(tokens, **kwargs):
    options = dict(mode="auto", checkpointing=True, tile=4096, chunk=2048, offload_asked=False)
    options.update(kwargs)
    return long_context.choose(FIGURES, tokens, **options)


def test_auto_takes_the_cheapest_setting_that_fits():
    short = _choose(4096)
    assert short.tile_tokens is None and not short.offload and short.source == "breakdown"
    mid = _choose(30_000)  # untiled at most 27,457 tokens fit; tiled 42,243; tiled and offloaded 222,481
    assert mid.tile_tokens == 4096 and not mid.offload
    long = _choose(100_000)  # needs the checkpoints on the host too
    assert long.tile_tokens == 4096 and long.offload
    for choice, tokens in ((short, 4096), (mid, 30_000), (long, 100_000)):
        assert choice.peak_bytes <= FIGURES.capacity_bytes
        assert choice.peak_bytes == FIGURES.peak(tokens, choice.tile_tokens, choice.offload, 2048)
    assert "breakdown: peak" in long.line("auto", 100_000)


def test_on_always_tiles_and_user_offload_stays():
    assert _choose(8192, mode="on").tile_tokens == 4096
    assert _choose(4096, offload_asked=True).offload


def test_a_context_that_cannot_fit_gets_the_verdict():
    fits = FIGURES.max_tokens(4096, True, 2048)
    assert FIGURES.peak(fits, 4096, True, 2048) <= FIGURES.capacity_bytes
    assert FIGURES.peak(fits + 1, 4096, True, 2048) > FIGURES.capacity_bytes
    assert fits == 222_481
    with pytest.raises(ConfigError, match=rf"config key 'max_seq_length': 300,000 tokens .* at most {fits:,} tokens fit"):
        _choose(300_000)
    # without gradient checkpointing the checkpoints cannot go to the host: fewer tokens fit, and it says why
    fewer = FIGURES.max_tokens(4096, False, 2048)
    assert fewer < fits
    with pytest.raises(ConfigError, match=rf"at most {fewer:,} tokens fit; gradient_checkpointing: true"):
        _choose(60_000, checkpointing=False)


class _ModelConfig:
    def __init__(self, limit, rope_scaling=None, rope_parameters=None):
        self.max_position_embeddings = limit
        self.rope_scaling = rope_scaling
        self.rope_parameters = rope_parameters


def test_context_above_max_positions_needs_rope_scaling():
    config = load_config(None, model="tiny-llama", dataset="d.jsonl", max_seq_length=8192, batch_tokens=8192)
    with pytest.raises(ConfigError, match=r"'max_seq_length' \(8,192\) is above the model's max_position_embeddings"):
        long_context.check_positions(config, _ModelConfig(4096))
    long_context.check_positions(config, _ModelConfig(4096, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    long_context.check_positions(config, _ModelConfig(4096, rope_parameters={"rope_type": "llama3", "factor": 8.0}))
    long_context.check_positions(config, _ModelConfig(8192))
    for unscaled in ({"rope_type": "default", "rope_theta": 1e4}, None):  # transformers 5 / older configs
        with pytest.raises(ConfigError):
            long_context.check_positions(config, _ModelConfig(4096, rope_scaling=unscaled, rope_parameters=unscaled))
    from transformers import LlamaConfig  # the real class: its rope_scaling mirrors rope_parameters

    with pytest.raises(ConfigError):
        long_context.check_positions(config, LlamaConfig(max_position_embeddings=4096))


def _trainer(tmp_path, **overrides):
    train, _ = make_records(12, 1, seed=1)
    write_jsonl(str(tmp_path / "train.jsonl"), train)
    options = dict(model="tiny-llama", tokenizer_vocab_size=290, dataset=str(tmp_path / "train.jsonl"),
                   model_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "num_key_value_heads": 1},
                   max_seq_length=64, batch_tokens=128, max_steps=2, output_dir=str(tmp_path / "out"),
                   progress_bar="off", mode="lora", lora_r=4, device="cpu")
    options.update(overrides)
    stream = io.StringIO()
    return Trainer(load_config(None, **options), stream=stream), stream


def test_trainer_tiles_offloads_and_logs_one_line(tmp_path, reference_ops, monkeypatch):
    trainer, stream = _trainer(tmp_path, long_context="on", mlp_tile_tokens=32, loss_chunk_tokens=48,
                               gradient_checkpointing=True, offload_activations=True)
    tiles, real = [], tiled_mlp._TiledMLP.backward

    def counted(ctx, grad):
        tiles.append(ctx.tile)
        return real(ctx, grad)

    monkeypatch.setattr(tiled_mlp._TiledMLP, "backward", staticmethod(counted))
    result = trainer.train()
    assert tiles and set(tiles) == {32}, "the step's MLPs did not take the tiled path"
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    lines = [line for line in stream.getvalue().splitlines() if "long_context" in line]
    assert lines == ["long_context on: 128 tokens per micro-batch; MLP tiles of 32 tokens above 32; "
                     "loss chunk 48 rows; offload on (from "
                     + lines[0].split("(from ", 1)[1]], lines
    mlps = [m for m in trainer.model.modules() if tiled_mlp.tile_tokens_of(m)]
    assert len(mlps) == 2 and all(tiled_mlp.tile_tokens_of(m) == 32 for m in mlps)
    assert loss_chunk.chunk_tokens_of(tiled_mlp.base_model_of(trainer.model)) == 48


def test_auto_default_sizes_from_free_memory(tmp_path, reference_ops):
    trainer, stream = _trainer(tmp_path, max_steps=1)
    trainer.setup()
    line = [line for line in stream.getvalue().splitlines() if "long_context" in line][0]
    free = tiled_mlp.free_memory_bytes(torch.device("cpu"))
    # this host's free memory makes a tile far above the 128-token batches: nothing is tiled in the step
    tile = next(tiled_mlp.tile_tokens_of(m) for m in trainer.model.modules() if tiled_mlp.tile_tokens_of(m))
    assert tile >= 1024 and tile > 128, line
    assert line.startswith("long_context auto: 128 tokens per micro-batch; MLP tiles of") and "GiB free" in line
    assert abs(tile - tiled_mlp.default_tile_tokens(48, 4, free)) <= 64 * 1024  # free memory moves a little


def test_off_sets_nothing(tmp_path, reference_ops):
    trainer, stream = _trainer(tmp_path, long_context="off", max_steps=1)
    trainer.setup()
    assert "long_context" not in stream.getvalue()
    assert not any(tiled_mlp.tile_tokens_of(m) for m in trainer.model.modules())
    assert loss_chunk.chunk_tokens_of(tiled_mlp.base_model_of(trainer.model)) is None


# ---------------------------------------------------------------- with fastsft plan's traces
ARCH = ("{model_type: llama, vocab_size: 512, hidden_size: 128, intermediate_size: 1024, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 65536}")


def _plan_config(*flags):
    from fastsft.plan import load_plan_config

    # patch_kernels: false until the kernels are torch.library operators the planner can trace (issue 29)
    return load_plan_config(None, ["--model", "tiny-llama", "--model_config", ARCH, "--mode", "lora",
                                   "--patch_kernels", "false", "--gradient_checkpointing", "true",
                                   "--precision", "bf16", "--max_seq_length", "2048", "--batch_tokens", "2048",
                                   *flags])


def test_planner_traces_pick_tiles_and_give_the_verdict():
    from fastsft.plan import Margin

    config = _plan_config()
    # a GPU whose budget (after the planner's stated margin) is 38 MiB: the untiled step (traced: about
    # 42 MiB at 2,048 tokens) does not fit, the tiled one does
    peaks = long_context.PlannerPeaks(config, GIB + 40 * 2**20)
    assert peaks.capacity_bytes == Margin().budget(GIB + 40 * 2**20)
    untiled, tiled = peaks.peak(2048, None, False, None), peaks.peak(2048, 256, False, None)
    assert tiled < peaks.capacity_bytes < untiled
    choice = long_context.choose(peaks, 2048, mode="auto", checkpointing=True, tile=256, chunk=None,
                                 offload_asked=False)
    assert choice.tile_tokens == 256 and not choice.offload and choice.peak_bytes == tiled
    assert choice.line("auto", 2048).endswith(f"(planner: peak {tiled / 2**20:.0f} MiB)")
    with pytest.raises(ConfigError, match=r"8,192 tokens per micro-batch do not fit in 38 MiB \(planner peak with "
                                          r"MLP tiles and offload: [0-9]+ MiB\); at most [0-9,]+ tokens fit"):
        long_context.choose(peaks, 8192, mode="auto", checkpointing=True, tile=256, chunk=None,
                            offload_asked=False)
    assert not config.offload_activations, "the traces switch offload on the planner's own copy"


def test_plan_before_load_consults_the_planner_for_long_context():
    config = _plan_config("--long_context", "on")
    arch = transformers_config()
    choice = long_context.plan_before_load(config, arch, torch.device("cpu"), 2, use_planner=True)
    assert choice.source == "planner" and choice.tile_tokens == 1024  # "on": tiles of half the batch at most
    short = _plan_config()  # auto: 2,048 tokens are far below this host's free-memory tile: no trace at all
    assert long_context.plan_before_load(short, arch, torch.device("cpu"), 2, use_planner=True) is None


def transformers_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)


def test_on_under_sequence_parallel_tiles_a_ranks_share():
    """sequence_parallel: 2 gives each rank's MLP 1,024 of the 2,048 tokens: `on` must tile those (tiles of
    at most half a rank's share), with the planner and from free memory alike, and the line says so."""
    config = _plan_config("--long_context", "on", "--sequence_parallel", "2")
    arch = transformers_config()
    tile, _, _ = long_context.free_sizes(config, arch, torch.device("cpu"), 2)
    assert tile <= 512
    choice = long_context.plan_before_load(config, arch, torch.device("cpu"), 2, use_planner=True)
    assert choice.source == "planner" and choice.tile_tokens == 512
    assert "2,048 tokens per micro-batch (1,024 per rank's MLP" in choice.line("on", 2048, rank=1024)
    assert long_context.rank_tokens(config) == 1024


@pytest.mark.parametrize("failure", [ConfigError("the planner cannot trace this step: a data-dependent shape"),
                                     RuntimeError("FakeTensor: no fake implementation for an op")])
def test_a_failed_trace_falls_back_to_free_memory_with_one_warning(monkeypatch, caplog, failure):
    """A trace error inside choose() is not a verdict: one warning line and None (free-memory sizing)."""
    from fastsft.plan.step import PreparedModel

    def broken(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(PreparedModel, "trace", broken)
    config = _plan_config("--long_context", "on")
    with caplog.at_level("WARNING", logger="fastsft"):
        assert long_context.plan_before_load(config, transformers_config(), torch.device("cpu"), 2,
                                             use_planner=True) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "fastsft"]
    assert len(warnings) == 1 and "sizes from free memory" in warnings[0] and str(failure) in warnings[0]
    assert "\n" not in warnings[0]


def test_the_verdict_still_stops_the_run_before_loading(monkeypatch):
    """Only trace failures fall back: "does not fit" from the planner's traces is still raised."""
    from fastsft.patch import tiled_mlp

    monkeypatch.setattr(tiled_mlp, "free_memory_bytes", lambda device: GIB + 40 * 2**20)
    config = _plan_config("--long_context", "on", "--max_seq_length", "8192", "--batch_tokens", "8192")
    with pytest.raises(ConfigError, match=r"8,192 tokens per micro-batch do not fit"):
        long_context.plan_before_load(config, transformers_config(), torch.device("cpu"), 2, use_planner=True)


def test_planner_peaks_add_ddps_gradient_buckets_on_a_ddp_rank(monkeypatch):
    """Under DDP (world > 1, no sequence parallelism) each rank also holds DDP's gradient buckets, a copy of
    the trainable gradients the one-process trace does not make: the planner's peaks include them."""
    config = _plan_config()
    alone = long_context.PlannerPeaks(config, GIB)
    assert alone.extra_bytes == 0
    monkeypatch.setattr(long_context, "_world_size", lambda: 2)
    ranked = long_context.PlannerPeaks(config, GIB)
    buckets = sum(p.numel() * p.element_size() for p in ranked.state.params)
    assert buckets > 0 and ranked.extra_bytes == buckets
    assert ranked.peak(1024, None, False, None) == alone.peak(1024, None, False, None) + buckets
    sp = long_context.PlannerPeaks(_plan_config("--sequence_parallel", "2"), GIB)
    assert sp.extra_bytes == 0  # the sequence-parallel trace adds them itself (fastsft.plan.sequence.per_rank)
