"""Compile report of the LoRA matmul kernel for a GPU target, on any machine (no GPU needed).

    python -m benchmarks.lora_sass [--arch 90] [--variant nf4_fwd ...]

Compiles ``fastsft_kernels.lora._lora_matmul_kernel`` with Triton's ahead-of-time
path (``GPUTarget("cuda", arch, 32)``, the wheel's ptxas), disassembles it with the
wheel's cuobjdump and prints, per variant and tile config: the SASS instructions in
the main loop body (one k-step, per thread), the HGMMA instructions in that body and
in the whole kernel, the shared memory and the register spills. These are compiler
counts, not timings.
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


def _signature(fn, is_4bit: bool, dt: str, constexprs: dict):
    ptr = {"a_ptr": dt, "w_ptr": "u8" if is_4bit else dt, "absmax_ptr": "fp32",
           "code_ptr": ("i64" if getattr(fn, "_fastsft_pair_table", True) else "fp32") if is_4bit else dt,
           "l_ptr": "fp32", "p_ptr": "fp32", "bias_ptr": dt, "out_ptr": dt}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = "*" + ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            # what the JIT sees at real shapes: sizes and row strides divisible by 16
            if name in ("N_OUT", "K_RED", "stride_am", "stride_wr", "stride_om", "stride_lm", "stride_pr", "stride_pn"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_variant(variant: str, cfg: dict, arch: int = 90, dtype: str = "bf16", rank: int = 16,
                    blocksize: int = 64, even_k: bool = True):
    """Compile one variant with one config; returns the compiled kernel (metadata + asm)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    lora = importlib.import_module("fastsft_kernels.lora")
    forward, is_4bit = VARIANTS[variant]
    fn = lora._lora_matmul_kernel
    dot = {"bf16": lora.tl.bfloat16, "fp16": lora.tl.float16}[dtype]
    constexprs = dict(W_ROWS_ARE_OUT=forward, IS_4BIT=is_4bit, PAIRED=is_4bit, QBLOCK=blocksize if is_4bit else 1,
                      ROWS_ALIGNED=is_4bit, HAS_BIAS=False, ACCUMULATE=False, DOT_DTYPE=dot, PRECISION=None,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                      BLOCK_R=lora._rank_block(rank), GROUP_M=cfg.get("GROUP_M", 8),
                      stride_ak=1, stride_wc=1, stride_lr=1, stride_on=1)
    # forward: p = B^T seen through B (out, r): unit stride along r; backward: p = A (r, in)
    constexprs["stride_pr" if forward else "stride_pn"] = 1
    if is_4bit:
        constexprs.update(stride_wr=0, stride_wc=0)
    if "EVEN_K" in fn.arg_names:
        constexprs["EVEN_K"] = even_k  # 4096 / 14336: multiples of BLOCK_K
    if "W_AS_A" in fn.arg_names:
        constexprs["W_AS_A"] = lora.w_as_a(forward, is_4bit)
        if os.environ.get("FASTSFT_SASS_W_AS_A") is not None:  # compare both layouts
            constexprs["W_AS_A"] = os.environ["FASTSFT_SASS_W_AS_A"] == "1"
    extra = getattr(lora, "kernel_extra_constexprs", None)
    if extra is not None:
        constexprs.update(extra(variant=variant, cfg=cfg, dtype=dtype))
    sig, attrs = _signature(fn, is_4bit, dtype, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


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


def report(variant: str, cfg: dict, arch: int = 90, dtype: str = "bf16") -> dict:
    kernel = compile_variant(variant, cfg, arch=arch, dtype=dtype)
    stats = loop_stats(sass_of(kernel))
    meta = kernel.metadata
    stats.update(variant=variant, arch=arch, dtype=dtype, shared=meta.shared,
                 spills=getattr(meta, "n_spills", None),
                 config="BM{BLOCK_M}/BN{BLOCK_N}/BK{BLOCK_K} w{num_warps} s{num_stages}".format(**cfg))
    ptx = kernel.asm.get("ptx", "")
    stats["spill_bytes_ptx"] = None
    m = re.search(r"(\d+) bytes spill stores", ptx)
    if m:
        stats["spill_bytes_ptx"] = int(m.group(1))
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_sass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    p.add_argument("--config", default=None, help="BM,BN,BK,warps,stages (default: every config)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    lora = importlib.import_module("fastsft_kernels.lora")
    if args.config:
        bm, bn, bk, w, s = (int(v) for v in args.config.split(","))
        cfgs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)]
    else:
        cfgs = None
    rows = []
    for variant in args.variant or sorted(VARIANTS):
        forward, is_4bit = VARIANTS[variant]
        if cfgs is None:
            todo = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                    for c in lora.matmul_configs(forward=forward, is_4bit=is_4bit, arch=args.arch)]
        else:
            todo = cfgs
        for cfg in todo:
            try:
                row = report(variant, cfg, arch=args.arch)
            except Exception as exc:  # one config failing must not hide the others
                row = {"variant": variant, "config": str(cfg), "error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
