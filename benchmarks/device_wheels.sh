#!/usr/bin/env bash
# Download into .whl/ the wheels the lent GPU machine's image lacks, for CPython 3.12 on manylinux x86-64,
# so that `python -m benchmarks.gpu_suite` can install them there without a network:
#
#     benchmarks/device_wheels.sh                 # bitsandbytes, liger-kernel, datasets, cut-cross-entropy,
#                                                 # Unsloth, and what of their dependencies the image lacks
#     benchmarks/device_wheels.sh --no-unsloth    # the same without Unsloth (about 6 MB instead of ~25)
#     WHEEL_DIR=other benchmarks/device_wheels.sh # another folder (default .whl, git-ignored)
#
# The image (torch 2.11+cu130, triton 3.6, transformers 5.17, peft, accelerate; its package list is in the
# device notes, KINDS.md) has everything else. One version of each package, --no-deps. What travels to the
# machine (this folder plus the repository) must stay under 60 MiB, so two wheels are repacked:
#   - bitsandbytes keeps only libbitsandbytes_cuda${BNB_CUDA} (the image's CUDA 13.0; bitsandbytes picks its
#     library from torch.version.cuda) and the CPU library; the libraries for CUDA 11.8-12.8, 13.2, ROCm and
#     XPU go (the wheel shrinks from 43 MB to about 2 MB);
#   - unsloth drops studio/ (its web UI's server and JavaScript front end, 82 MB unpacked; nothing under
#     unsloth/ or unsloth_zoo/ imports it).
# xformers is not carried (about 100 MB and optional: Unsloth falls back to PyTorch SDPA without it).
# datasets is 4.8.5, not the 5.x the CPU venv has: Unsloth and unsloth_zoo require datasets < 5, and one
# version must serve both fastsft and Unsloth in one install.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$ROOT/.whl}"
PYTHON="${PYTHON:-python3}"
BNB_CUDA="${BNB_CUDA:-130}"
LIMIT_MIB=60
WITH_UNSLOTH=1
for arg in "$@"; do
    case "$arg" in
        --no-unsloth) WITH_UNSLOTH=0 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "device_wheels.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

CORE=(
    bitsandbytes==0.50.2
    liger-kernel==0.8.5
    datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
    cut-cross-entropy==25.1.1
)
UNSLOTH=(
    unsloth==2026.10.9 unsloth_zoo==2026.10.9
    trl==1.15.0 torchao==0.18.0
    tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
    msgspec==0.23.0 json5==0.17.3 structlog==26.1.0 nest-asyncio==1.6.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5
    hf_transfer==0.1.9 diffusers==0.42.1 importlib-metadata==8.7.0
)
PACKAGES=("${CORE[@]}")
if [ "$WITH_UNSLOTH" = 1 ]; then PACKAGES+=("${UNSLOTH[@]}"); fi

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# the platform tags pip accepts must be listed one by one: pip matches manylinux_2_N exactly
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"

"$PYTHON" - "$DEST" "$BNB_CUDA" <<'EOF'
"""Repack bitsandbytes (one CUDA library) and unsloth (no studio/) in place, RECORD rewritten to match."""
import base64, glob, hashlib, os, re, sys, zipfile

dest, cuda = sys.argv[1], sys.argv[2]


def repack(pattern, drop, what):
    for path in glob.glob(os.path.join(dest, pattern)):
        before = os.path.getsize(path)
        tmp = path + ".tmp"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            kept = [i for i in src.infolist() if not drop(i.filename)]
            if not any(i.filename.endswith(".so") for i in kept) and pattern.startswith("bitsandbytes"):
                sys.exit(f"device_wheels.sh: {os.path.basename(path)} has no libbitsandbytes_cuda{cuda}.so")
            record_name = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
            lines = []
            for info in kept:
                if info.filename == record_name:
                    continue
                data = src.read(info.filename)
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{info.filename},sha256={digest},{len(data)}")
            lines.append(f"{record_name},,")
            out.writestr(record_name, "\n".join(lines) + "\n")
        os.replace(tmp, path)
        print(f"repacked {os.path.basename(path)}: {what}; {before / 2**20:.1f} -> "
              f"{os.path.getsize(path) / 2**20:.1f} MiB")


keep = {f"bitsandbytes/libbitsandbytes_cuda{cuda}.so", "bitsandbytes/libbitsandbytes_cpu.so"}
repack("bitsandbytes-*.whl",
       lambda name: re.fullmatch(r"bitsandbytes/libbitsandbytes_.*\.so", name) is not None and name not in keep,
       f"kept libbitsandbytes_cuda{cuda}.so and libbitsandbytes_cpu.so only")
repack("unsloth-*.whl", lambda name: name.startswith("studio/"), "dropped studio/ (the web UI)")
EOF

# one version of each distribution: two would stop the whole install on the machine
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then echo "device_wheels.sh: more than one version of: $dupes" >&2; exit 1; fi

wheels_b=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
repo_b=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
         | awk '$2 == "total" {s += $1} END {print s + 0}')
total_b=$((wheels_b + repo_b))
ls -l "$DEST"
awk -v n="$(ls "$DEST"/*.whl | wc -l)" -v w="$wheels_b" -v r="$repo_b" -v d="$DEST" -v l="$LIMIT_MIB" 'BEGIN {
    printf "wheels: %d files, %.1f MiB in %s; repository: %.1f MiB; together %.1f MiB (limit %d MiB)\n",
           n, w / 1048576, d, r / 1048576, (w + r) / 1048576, l }'
if [ "$total_b" -ge $((LIMIT_MIB * 1048576)) ]; then
    echo "device_wheels.sh: over the $LIMIT_MIB MiB limit; use --no-unsloth and a second call for Unsloth" >&2
    exit 1
fi
