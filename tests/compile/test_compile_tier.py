"""The compile tier: every Triton kernel compiled for sm_90 and sm_80 on the CPU.

Runs `python -m benchmarks.compile_report` in a subprocess (the tests' conftest turns on
Triton's interpreter, under which kernels cannot be compiled) and checks each row: it
compiles; spilled bytes within the spec's budget (0 unless a reason is stated); shared
memory within the arch's limit unless the spec says why that config is never launched
there; wgmma on sm_90 for every bf16/fp16 tl.dot. The default run compiles one
representative config per kernel x dtype (CI budget: a few minutes on 2 cores);
FASTSFT_COMPILE_FULL=1 compiles every config the launchers can pick.

The tier runs once per Triton version: by default the oldest and the newest that
pyproject.toml admits (3.6, the GPU image's, and 3.9). A version other than the
running one is installed once into a cache folder (tests/compile/triton_envs.py: one
wheel download, `pip install --no-deps --target`) and put first on the subprocess's
PYTHONPATH. FASTSFT_COMPILE_TRITON=all|current|3.7,3.8 picks other versions.
"""
import fcntl
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fastsft_compile_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


aot = _load("aot")
triton_envs = _load("triton_envs")
_MISSING = aot.missing_tools()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"compile tier needs the triton wheel's tools: {_MISSING}")


def tier_versions() -> list:
    """The Triton minors the tier compiles with: the oldest and newest admitted, unless told otherwise."""
    admitted = triton_envs.admitted_minors()
    wanted = os.environ.get("FASTSFT_COMPILE_TRITON", "").strip()
    if wanted == "all":
        return admitted
    if wanted == "current":
        return [triton_envs.minor_of(triton_envs.running_version())]
    if wanted:
        return [v.strip() for v in wanted.split(",") if v.strip()]
    return sorted({admitted[0], admitted[-1]}, key=admitted.index)


@pytest.fixture(scope="module", params=tier_versions(), ids=lambda minor: f"triton{minor}")
def report(request, tmp_path_factory):
    # one compile per version per session: pytest-xdist workers share the session's folder above
    # their own and wait on its lock for the first one's report
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    with open(shared / f"fastsft-compile-{request.param}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out = shared / f"fastsft-compile-{request.param}.json"
        if not out.exists():
            _compile(request.param, out)
        with open(out) as f:
            return json.load(f)


def _compile(minor, out):
    try:
        env = triton_envs.env_for(minor, log=lambda _: None)
    except RuntimeError as exc:  # no index reachable: say which setting runs without it
        pytest.fail(f"triton {minor} is not installed and could not be ({exc}); "
                    "FASTSFT_COMPILE_TRITON=current compiles with the running Triton only")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--triton", "current", "--json",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout)  # the table (pytest -s, or shown with a failure)
    assert proc.returncode == 0, f"compile_report failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out) as f:
        version = json.load(f)["triton"]
    assert triton_envs.minor_of(version) == minor, f"compiled with triton {version}, not {minor}"


def test_every_kernel_config_passes_the_compile_rules(report):
    rows = report["rows"]
    assert rows, "the compile tier compiled nothing"
    failures = [f"{r['kernel']} [{r['config']}] {r['dtype']} {r['arch']}: {'; '.join(aot.problems(r))}"
                for r in rows if aot.problems(r)]
    assert not failures, "compile tier failures:\n" + "\n".join(failures) + "\n\n" + aot.format_table(rows)


def test_both_archs_and_every_dtype_are_compiled(report):
    rows = report["rows"]
    archs = {r["arch"] for r in rows}
    assert archs == {"sm_90", "sm_80"}
    for kernel in {r["kernel"] for r in rows if r["dtype"] in ("bfloat16", "float32", "float16")}:
        dtypes = {r["dtype"] for r in rows if r["kernel"] == kernel}
        assert {"bfloat16", "float32"} <= dtypes, f"{kernel}: only {sorted(dtypes)} compiled"


def test_attention_runs_on_wgmma_at_every_head_dim(report):
    rows = [r for r in report["rows"] if r["kernel"].startswith("attention.") and r["dtype"] == "bfloat16"
            and r["arch"] == "sm_90" and r["dot16"]]
    seen = {(r["kernel"], r["config"].split()[0]) for r in rows}
    for kernel in ("attention._fwd_kernel", "attention._bwd_dkdv_kernel", "attention._bwd_dq_kernel"):
        for head_dim in ("d64", "d128", "d256"):
            assert (kernel, head_dim) in seen, f"{kernel} {head_dim} missing from the compile tier"
    for r in rows:
        assert r["mma"] == "wgmma" and r["hgmma"] > 0, r
        assert r["spill_stores"] <= r["spill_budget"], r


def test_every_triton_kernel_has_a_spec():
    """A new @triton.jit kernel (a module-level *_kernel) must be added to specs.py."""
    sys.path.insert(0, HERE)
    try:
        specs = importlib.import_module("specs")
    finally:
        sys.path.remove(HERE)
    listed = {s.kernel for make in specs.SPEC_TABLE for s in make()}
    names = ("attention", "cross_entropy", "lora", "quant", "norm", "rope", "swiglu")
    found = set()
    for name in names:
        module = importlib.import_module(f"fastsft_kernels.{name}")
        for attr, value in vars(module).items():
            if attr.endswith("_kernel") and hasattr(value, "fn") and hasattr(value, "arg_names"):
                found.add(f"{name}.{attr}")
    assert found, "no Triton kernels found"
    assert found <= listed, f"kernels without a compile spec: {sorted(found - listed)}"
