"""One training step of a patched model under torch.cuda.set_sync_debug_mode("error").

    python -m benchmarks.sync_step            # a GPU: every mode, forward + backward must not sync the host
    python -m benchmarks.sync_step --smoke    # CPU: the same steps without the sync check (it needs CUDA)

The model comes from the trainer's own builder (fastsft.train.model.load_model, from a TrainConfig, via the
e2e benchmark's fastsft provider) and the batch is a packed row of several documents (fastsft.data.collate),
moved to the device before the check starts. A warm-up step runs first (Triton compiles and autotunes
there, which may sync); then forward and backward run under sync debug mode "error", where any
synchronizing CUDA call raises. The optimizer step runs outside the check. Prints one line per mode and
exits 1 if any mode synced or failed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

from .e2e_models import Arch

# big enough for real kernel configs, small enough to build in seconds
SYNC_ARCH = Arch("sync-llama", "llama", "(sync-check config)", dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=4, head_dim=128, vocab_size=32768, max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    bos_token_id=1, eos_token_id=2))
MODES = ("qlora", "lora", "full")


def run_mode(mode: str, model_dir: str, device: str, seq: int) -> str:
    """'ok' or the reason the step failed (the first synchronizing call's message and where)."""
    import torch

    from .e2e_data import layout, make_steps, to_device
    from .e2e_models import build_config, pad_token_id
    from .e2e_providers import PROVIDERS, make_optimizer

    job = dict(model="sync-llama", mode=mode, model_dir=model_dir, device=device, seed=0, seq=seq,
               lora_rank=16, lora_alpha=32, grad_ckpt=True, offload=False,
               precision="bf16" if device == "cuda" else "fp32")
    config = build_config(SYNC_ARCH if device == "cuda" else _smoke_arch())
    model = PROVIDERS["fastsft"].build(job)
    model.train()
    optimizer = make_optimizer(model)
    steps = make_steps(2, seq=seq, vocab_size=config.vocab_size, seed=0, median=max(16, seq // 6))
    batches = [to_device(layout(s, "packed", pad_token_id=pad_token_id(config)), device) for s in steps]
    autocast = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else torch.autocast(device,
                                                                                                   enabled=False)
    for i, batch in enumerate(batches):
        checked = i == 1 and device == "cuda"
        if device == "cuda":
            torch.cuda.synchronize()
        try:
            if checked:
                torch.cuda.set_sync_debug_mode("error")
            with autocast:
                loss = model(**batch).loss
            loss.backward()
        except RuntimeError as exc:
            if checked:
                where = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)]
                return f"synced: {str(exc).splitlines()[0]} (innermost frames: {'; '.join(where[-3:])})"
            raise
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode(0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss.detach()).item():
        return f"non-finite loss {loss.item()}"
    return "ok"


def _smoke_arch():
    from .e2e_models import get_arch

    return get_arch("tiny-llama")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sync_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, no sync check (it needs CUDA)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--seq", type=int, default=None, help="tokens in the packed row (default 4096; smoke 96)")
    args = p.parse_args(argv)
    import torch

    from .e2e_models import save_random_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("benchmarks.sync_step needs a CUDA GPU; none found. Use --smoke for the CPU steps.")
        return 0
    device = "cuda" if cuda else "cpu"
    seq = args.seq or (4096 if cuda else 96)
    if not cuda:
        print("sync debug mode needs CUDA: the CPU smoke run checks the steps run, not that they do not sync")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fastsft-sync-step-") as tmp:
        folder = os.path.join(tmp, "model")
        save_random_model(SYNC_ARCH if cuda else _smoke_arch(), folder, seed=0, device=device,
                          dtype=torch.bfloat16 if cuda else torch.float32)
        for mode in modes:
            t0 = time.monotonic()
            try:
                status = run_mode(mode, folder, device, seq)
            except Exception as exc:
                traceback.print_exc()
                status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            failed += status != "ok"
            check = "forward + backward under sync debug mode 'error'" if cuda else "forward + backward (CPU)"
            print(f"sync_step {mode}: {status} ({check}, {seq} packed tokens, {time.monotonic() - t0:.1f} s)",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
