"""The launchers pick some tiles by Triton version (the compile tier per version says why):
the older releases get their replacement tiles, 3.9 keeps the base tables, and the choice
follows triton.__version__ at call time."""
import pytest
import torch

from fastsft_kernels import _triton_utils, attention, lora


@pytest.fixture
def compiled(monkeypatch):
    """Tile choice as on a GPU (the interpreter has its own small tiles), at a chosen Triton version."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def at(version):
        monkeypatch.setattr(attention, "triton_version", lambda: version)
        monkeypatch.setattr(lora, "triton_version", lambda: version)
    return at


def test_attention_takes_the_older_triton_tiles_up_to_their_last_release(compiled):
    compiled((3, 9))
    assert attention._configs(64, torch.bfloat16, 90) == attention._HOPPER_16BIT[64]
    assert attention._configs(256, torch.bfloat16, 90)["dq"] == (128, 32, 8, 1)
    assert attention.tile_notes() == []
    compiled((3, 8))
    assert attention._configs(256, torch.bfloat16, 90)["dq"] == (128, 32, 8, 2)  # through 3.8
    assert attention._configs(64, torch.bfloat16, 90)["dkdv"] == (64, 128, 8, 2)  # 3.6 only
    assert attention._configs(64, torch.float32, 90)["dkdv"] == (16, 16, 4, 1)  # through 3.8
    compiled((3, 6))
    hopper = attention._configs(64, torch.bfloat16, 90)
    assert hopper["dkdv"] == (32, 128, 8, 2) and hopper["fwd"] == attention._HOPPER_16BIT[64]["fwd"]
    assert attention._configs(64, torch.float16, 80) == attention._AMPERE_16BIT[64]  # Ampere 16-bit: unchanged
    assert attention._configs(128, torch.float32, 80)["dkdv"] == (16, 32, 8, 1)
    assert attention._configs(100, torch.float32, 90)["dkdv"] == (16, 32, 8, 1)  # by head_dim bucket
    assert len(attention.tile_notes()) == len(attention._OLDER_TRITON_TILES)
    assert attention._HOPPER_16BIT[64]["dkdv"] == (64, 128, 8, 2)  # the tables themselves are left alone


def test_lora_leaves_out_the_tiles_an_older_triton_spills(compiled):
    big = (128, 256, 64, 8, 3)

    def tiles(arch, forward=True):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in lora.matmul_configs(forward=forward, is_4bit=True, arch=arch)}

    compiled((3, 9))
    newest = tiles(80)
    assert big in newest and lora.tile_notes() == []
    compiled((3, 6))
    assert tiles(80) == newest - {big} and big in tiles(90)  # only that tile, only on sm_80
    assert "6.8 KB" in lora.tile_notes()[0]
    compiled((3, 8))
    assert tiles(80) == newest and lora.tile_notes() == []  # through 3.7


def test_the_version_is_read_from_triton(monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0+git1234")
    assert _triton_utils.triton_version() == (3, 6)
