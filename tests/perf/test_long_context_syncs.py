"""Host syncs with issue 22's long-context paths on: still none in forward + backward.

The trainer's step (as test_host_syncs) with the MLP over token tiles (every MLP tiled: tiles of
16 tokens on 64-token batches), the loss in 16-row chunks and the checkpoints offloaded through
OverlappedOffload, the Triton kernels running through the interpreter.
"""
import pytest
import torch

from fastsft.patch import tiled_mlp
from fastsft.train import offload as offload_module

from .test_host_syncs import count_step, trainer_for


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_no_host_sync_with_tiles_chunks_and_offload(tmp_path, sync_counter, monkeypatch, mode):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    real_load = trainer_for.__globals__["load_config"]

    def load_config(*args, **kwargs):  # trainer_for's config plus the long-context keys
        kwargs.update(mlp_tile_tokens=16, loss_chunk_tokens=16, offload_activations=True, long_context="on")
        return real_load(*args, **kwargs)

    monkeypatch.setitem(trainer_for.__globals__, "load_config", load_config)
    tiles, offloads = [], []
    real_backward, real_init = tiled_mlp._TiledMLP.backward, offload_module.OverlappedOffload.__init__

    def backward(ctx, grad):
        tiles.append(ctx.tile)
        return real_backward(ctx, grad)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        offloads.append(self)

    monkeypatch.setattr(tiled_mlp._TiledMLP, "backward", staticmethod(backward))
    monkeypatch.setattr(offload_module.OverlappedOffload, "__init__", init)
    trainer = trainer_for(tmp_path, mode, "bf16")
    record, fwd_bwd, whole = count_step(trainer, sync_counter, monkeypatch)
    assert record is not None and torch.isfinite(torch.tensor(record["loss"]))
    assert tiles and set(tiles) == {16}, "the MLPs did not run over tiles"
    assert offloads and all(o.stats["offloaded"] > 0 and o.stats["prefetched"] + o.stats["synchronous"]
                            == o.stats["offloaded"] for o in offloads), "the checkpoints were not offloaded"
    assert fwd_bwd.triton_launches > 0, "the kernels did not take the Triton path"
    assert not fwd_bwd.events, f"{mode}: host syncs in forward + backward:\n{fwd_bwd.summary()}"
