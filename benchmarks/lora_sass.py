"""Compile report of the LoRA matmul kernel for a GPU target, on any machine (no GPU needed).

    python -m benchmarks.lora_sass [--arch 90] [--variant nf4_fwd ...]

Compiles the entries of ``fastsft_kernels.lora.launch_variants`` (what the launcher
can pick on that arch) with Triton's ahead-of-time path (``GPUTarget("cuda", arch,
32)``, the wheel's ptxas), disassembles them with the wheel's cuobjdump and prints,
per variant and tile config: the SASS instructions in the main loop body (one
k-step, per thread), the HGMMA instructions in that body and in the whole kernel,
and the shared memory (with the launcher's estimate it prunes by). These are
compiler counts, not timings.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

VARIANTS = {
    # name: (forward, is_4bit)
    "dense_fwd": (True, False), "dense_bwd": (False, False),
    "nf4_fwd": (True, True), "nf4_bwd": (False, True),
}


def _entries(variant: str, arch: int, dtype: str = "bf16", rank: int = 16):
    """The launcher's entries (fastsft_kernels.lora.launch_variants) for one variant: no bias, no accumulation."""
    import importlib

    lora = importlib.import_module("fastsft_kernels.lora")
    forward, is_4bit = VARIANTS[variant]
    prefix = f"lora_matmul_{'fwd' if forward else 'bwd_dx'}_{'4bit' if is_4bit else 'dense'}_{dtype}_r{rank}_BM"
    return [e for e in lora.launch_variants(arch=arch, dtypes=(dtype,), ranks=(rank,)) if e["name"].startswith(prefix)]


def compile_entry(entry: dict, arch: int = 90):
    """Compile one launch_variants entry for ``arch`` (Triton's ahead-of-time path; no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(entry["constexprs"])
    if os.environ.get("FASTSFT_SASS_W_AS_A") is not None:  # compare both layouts of the forward
        constexprs["W_AS_A"] = os.environ["FASTSFT_SASS_W_AS_A"] == "1"
    src = ASTSource(fn=entry["fn"], signature=entry["signature"], constexprs=constexprs, attrs=entry["attrs"])
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=entry["options"])


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass_of(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        return subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_stats(sass: str) -> dict:
    """Instructions in the main loop body (the largest backward-branch range) and HGMMA counts."""
    insns = []  # (address, opcode, operands)
    for m in _INSN.finditer(sass):
        insns.append((int(m.group(1), 16), m.group(3), m.group(4)))
    by_addr = {a: i for i, (a, _, _) in enumerate(insns)}
    best = (0, 0)
    for i, (addr, op, rest) in enumerate(insns):
        if op.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", rest)
            if t:
                target = int(t.group(1), 16)
                if target < addr and target in by_addr:
                    j = by_addr[target]
                    if i - j + 1 > best[1] - best[0]:
                        best = (j, i + 1)
    body = insns[best[0]:best[1]]
    return {"loop_insns": len(body),
            "loop_hgmma": sum(op.startswith("HGMMA") for _, op, _ in body),
            "total_hgmma": sum(op.startswith("HGMMA") for _, op, _ in insns),
            "loop_lds_gather": sum(op.startswith(("LDG", "LDGSTS")) for _, op, _ in body),
            "total_insns": len(insns)}


def report(entry: dict, arch: int = 90) -> dict:
    kernel = compile_entry(entry, arch=arch)
    stats = loop_stats(sass_of(kernel))
    stats.update(name=entry["name"], arch=arch, shared=kernel.metadata.shared,
                 smem_estimate=entry["smem_estimate"])
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    p.add_argument("--config", default=None, help="only tiles named like BM128_BN128_BK64_w8_s3")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    rows = []
    for variant in args.variant or sorted(VARIANTS):
        for entry in _entries(variant, args.arch):
            if args.config and not entry["name"].endswith(args.config):
                continue
            try:
                row = report(entry, arch=args.arch)
            except Exception as exc:  # one config failing must not hide the others
                row = {"name": entry["name"], "error": f"{type(exc).__name__}: {exc}"[:300]}
            row["variant"] = variant
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
