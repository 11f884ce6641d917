"""Ahead-of-time compilation of one kernel spec for a GPU architecture, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole
pipeline down to a cubin with the ptxas that ships in the triton wheel. From it we read:
registers and spilled bytes (ptxas -v, which Triton already runs: we capture its log),
shared memory (the kernel metadata), and from the SASS (the wheel's cuobjdump) the MMA
kind, the HGMMA / HMMA counts and the size of each innermost loop.

Must run in a process where TRITON_INTERPRET is unset: under the interpreter
``@triton.jit`` builds interpreted functions, which cannot be compiled.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

# per-block opt-in shared memory limits (CUDA programming guide, compute capabilities table)
SMEM_LIMIT = {90: 232448, 80: 166912}  # 227 KB, 163 KB
ARCHS = (90, 80)


def triton_bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_tools():
    """The ptxas binaries Triton runs (sm_80: ``ptxas``; sm_90+: ``ptxas_blackwell`` in Triton 3.9)."""
    from triton import knobs

    tools = {}
    for attr in ("ptxas", "ptxas_blackwell"):
        tool = getattr(knobs.nvidia, attr, None)
        if tool is not None:
            tools[attr] = tool
    return tools


def missing_tools() -> Optional[str]:
    """None when the ptxas Triton uses and the wheel's cuobjdump are there, else the reason not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a hard dependency
        return f"triton is not importable: {exc}"
    for name, tool in _ptxas_tools().items():
        try:
            path = tool.path
        except Exception as exc:  # the knob raises when the binary cannot be found
            return f"{name} not found ({exc})"
        if not path or not os.access(path, os.X_OK):
            return f"{name} not found ({path})"
    cuobjdump = os.path.join(triton_bin_dir(), "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        return f"cuobjdump not found in the triton wheel ({cuobjdump})"
    return None


def tool_versions() -> dict:
    """ptxas release per tool, for the report's header."""
    out = {}
    for name, tool in _ptxas_tools().items():
        try:
            text = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout
            out[name] = next((line for line in text.splitlines() if "release" in line), text.strip()[-80:])
        except Exception as exc:  # reported, never fatal
            out[name] = f"unknown ({type(exc).__name__})"
    return out


@dataclass
class Spec:
    """One compile job: a kernel with the arguments and config its launcher uses.

    ``args`` maps each runtime argument to a pointer type ("*bf16") or a Python value at
    the target shape (ints and floats are specialised the way the launch would be:
    1 -> constexpr, multiples of 16 -> divisibility hint). Unlisted non-constexpr
    arguments are ints that are not multiples of 16.
    """

    kernel: str  # "attention._bwd_dkdv_kernel"
    config: str  # short label of the launch config
    dtype: str  # activation dtype the config serves
    fn: object  # the @triton.jit function
    args: Dict[str, object]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    ci: bool = True  # part of the default (CI) run; the rest only with FASTSFT_COMPILE_FULL=1
    dot16: bool = False  # has a tl.dot on bf16/fp16 tiles: must emit wgmma on sm_90
    spill_budget: Dict[int, int] = field(default_factory=dict)  # arch -> bytes, with a reason
    budget_reason: str = ""
    smem_exempt: Dict[int, str] = field(default_factory=dict)  # arch -> why over the limit is fine
    archs: tuple = ARCHS
    # (signature, constexprs, attrs) when the launcher lists them itself (lora.launch_variants)
    prebuilt: Optional[tuple] = None
    smem_limit_hint: Optional[int] = None  # the bytes the launcher's host-side prune assumed
    loop_free_spills: bool = False  # the budget covers spills outside the innermost loops only: checked

    def key(self, arch: int) -> str:
        return f"{self.kernel}|{self.config}|{self.dtype}|sm_{arch}"


def _signature(spec: Spec):
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    fn = spec.fn
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    signature, constants, attrs = {}, dict(spec.constexprs), {}
    for i, name in enumerate(names):
        if params[name].is_constexpr:
            if name not in constants:
                if not params[name].has_default:
                    raise KeyError(f"{spec.kernel}: constexpr {name} has no value in the spec")
                constants[name] = params[name].default
            signature[name] = "constexpr"
            continue
        value = spec.args.get(name, 17)
        if isinstance(value, str):  # a pointer
            signature[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            continue
        ty, spec_key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # an int equal to 1 is specialised to the constant
            signature[name] = "constexpr"
            constants[name] = value
            continue
        signature[name] = ty
        if spec_key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LOCAL = re.compile(r"\b(LDL|STL)\b")


def sass_stats(sass: str) -> dict:
    """HGMMA / HMMA counts and the innermost loops (instructions, HGMMAs per iteration)."""
    insns = []  # (address, text)
    for line in sass.splitlines():
        m = _INSN.match(line)
        if m:
            insns.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for addr, text in insns:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m:
            target = int(m.group(1), 16)
            if target < addr:
                loops.append((target, addr))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    loop_stats = []
    for a, b in sorted(inner):
        body = [t for addr, t in insns if a <= addr <= b]
        # local-memory loads / stores inside the loop: a spill there costs every iteration
        loop_stats.append({"instructions": len(body), "hgmma": sum("HGMMA" in t for t in body),
                           "hmma": sum("HMMA" in t for t in body),
                           "local": sum(bool(_LOCAL.search(t)) for t in body)})
    hgmma = sum("HGMMA" in t for _, t in insns)
    hmma = sum("HMMA" in t for _, t in insns)
    shapes = sorted({re.search(r"HGMMA\.(\d+x\d+x\d+)", t).group(1) for _, t in insns if "HGMMA." in t})
    return {"instructions": len(insns), "hgmma": hgmma, "hmma": hmma, "hgmma_shapes": shapes,
            "inner_loops": loop_stats}


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(spec: Spec, arch: int) -> dict:
    """Compile ``spec`` for sm_<arch>; a row of the report (status "ok" or "error")."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": spec.kernel, "config": spec.config, "dtype": spec.dtype, "arch": f"sm_{arch}",
           "num_warps": spec.num_warps, "num_stages": spec.num_stages, "ci": spec.ci, "dot16": spec.dot16,
           "smem_limit": SMEM_LIMIT[arch], "spill_budget": spec.spill_budget.get(arch, 0),
           "budget_reason": spec.budget_reason if spec.spill_budget.get(arch, 0) else "",
           "smem_exempt": spec.smem_exempt.get(arch, ""), "smem_estimate": spec.smem_limit_hint,
           "loop_free_spills": spec.loop_free_spills and bool(spec.spill_budget.get(arch, 0))}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        signature, constants, attrs = spec.prebuilt if spec.prebuilt is not None else _signature(spec)
        src = ASTSource(spec.fn, signature, constants, attrs)
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` log it otherwise drops
        knobs.compilation.always_compile = True  # two specs may specialise alike: no cache hit, ptxas runs
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # reported as a row: the test names the failing spec
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:800]}")
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        return row
    text = log.getvalue()
    regs = [int(x) for x in _PTXAS_REGS.findall(text)]
    spills = _PTXAS_SPILL.findall(text)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(triton_bin_dir(), "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    stats = sass_stats(sass)
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "none"
    row.update(status="ok", registers=max(regs) if regs else None,
               spill_stores=int(spills[-1][0]) if spills else None,
               spill_loads=int(spills[-1][1]) if spills else None,
               smem=int(compiled.metadata.shared), mma=mma, **stats,
               compile_s=round(time.perf_counter() - t0, 2))
    if row["registers"] is None or row["spill_stores"] is None:
        row.update(status="error", error="no ptxas -v register/spill line in the log:\n" + text[-800:])
    return row


def problems(row: dict) -> list:
    """What the compile tier rejects in one row (empty when it passes)."""
    if row["status"] != "ok":
        return [f"does not compile: {row.get('error')}"]
    out = []
    if row["spill_stores"] > row["spill_budget"]:
        out.append(f"spills {row['spill_stores']} bytes (budget {row['spill_budget']})")
    in_loops = sum(lp.get("local", 0) for lp in row.get("inner_loops") or [])
    if row.get("loop_free_spills") and in_loops:
        out.append(f"{in_loops} local-memory loads/stores inside an innermost loop (its budget allows spills "
                   "outside the loops only)")
    if row["smem"] > row["smem_limit"] and not row["smem_exempt"]:
        out.append(f"shared memory {row['smem']} bytes > {row['smem_limit']} ({row['arch']} limit)")
    if row.get("smem_estimate") is not None and row["smem"] > row["smem_estimate"]:
        out.append(f"shared memory {row['smem']} bytes > the launcher's estimate {row['smem_estimate']} "
                   "(its host-side prune would keep a config that does not fit)")
    if row["dot16"] and row["arch"] == "sm_90" and row["mma"] != "wgmma":
        out.append(f"bf16/fp16 tl.dot compiles to {row['mma']}, not wgmma, on sm_90")
    if row["dot16"] and row["mma"] == "none":
        out.append("bf16/fp16 tl.dot emits no tensor-core MMA")
    return out


COLUMNS = ("kernel", "config", "dtype", "arch", "registers", "spill_stores", "smem", "mma", "hgmma", "inner")


def format_table(rows) -> str:
    def cell(row, col):
        if col == "inner":
            loops = row.get("inner_loops") or []
            return " ".join(f"{lp['instructions']}/{lp['hgmma'] or lp['hmma']}" for lp in loops) or "-"
        if col == "smem" and row.get("status") == "ok":
            flag = "*" if row["smem"] > row["smem_limit"] else ""
            return f"{row['smem']}{flag}"
        if col == "hgmma":
            return str(row.get("hgmma", "-")) if row.get("arch") == "sm_90" else str(row.get("hmma", "-"))
        value = row.get(col, "-") if row.get("status") == "ok" or col in ("kernel", "config", "dtype", "arch") \
            else "ERR"
        return "-" if value is None else str(value)

    head = {"spill_stores": "spills", "hgmma": "mma#", "inner": "inner loops insn/mma"}
    cells = [[head.get(c, c) for c in COLUMNS]] + [[cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("mma#: HGMMA count on sm_90, HMMA on sm_80; inner loops: SASS instructions / MMAs per iteration "
                 "of each innermost loop; * over the arch's shared memory limit (see smem_exempt)")
    return "\n".join(lines)
