"""Package discovery only; all other metadata lives in pyproject.toml.

The kernel library sits in ``kernels/`` but installs under the import name
``fastsft_kernels`` (a top-level ``kernels`` module would shadow Hugging Face's
package of that name, which transformers and bitsandbytes probe).
"""
from setuptools import find_packages, setup

kernel_packages = ["fastsft_kernels"] + [
    "fastsft_kernels." + name for name in find_packages(where="kernels")
]
setup(
    packages=find_packages(include=["fastsft", "fastsft.*"]) + kernel_packages,
    package_dir={"fastsft": "fastsft", "fastsft_kernels": "kernels"},
)
