"""fastsft benchmarks: `python -m benchmarks.kernels` and `python -m benchmarks.e2e`.

`python -m` puts the current directory (the repository root) first on sys.path,
where the folder kernels/ would import as a top-level module named `kernels`,
the name of Hugging Face's kernels package that transformers probes. Drop the
root from sys.path as soon as this package loads; fastsft and fastsft_kernels
come from the installed distribution.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
