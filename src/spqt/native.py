"""C compiled on first use: one mechanism for SpQt's C sources (kernels/cpu_native.c, the CPU
GEMVs; formats/q4_k_encode.c, the Q4_K encoder).

A source is compiled with the machine's C compiler (``$CC``, else ``cc``), with OpenMP when the
compiler has it, into the cache ($SPQT_CACHE/cpu or ~/.cache/spqt/cpu, keyed by the source, the
flags, the compiler and the machine), written under a temporary name and renamed, and loaded
through ctypes. Without a working compiler, :func:`load` says why in one line and the caller
falls back to torch.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from spqt import default_model

# quantize_source's worker threads may ask for a library at the same moment: one compiles it.
_lock = threading.Lock()
# A compile takes 1-2 s here (gcc 12, 2-core VM); a compiler that hangs must not hang the first run.
COMPILE_TIMEOUT_S = 300


def cache_dir() -> Path:
    return default_model.cache_dir() / "cpu"


def machine() -> str:
    """What -march=native compiles for: the architecture, and on Linux the CPU's model and flags
    (a cache shared by two machines must not hand one the other's instructions)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))][:3]
    return repr((platform.machine(), platform.processor(), cpu))


def build(compiler: str, source: Path, flags: tuple, path: Path) -> ctypes.CDLL:
    """Compile source with these flags into path (unless it is there) and load it. Raises OSError
    or subprocess.CalledProcessError (its stderr the compiler's) when either fails."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], check=True, capture_output=True,
                           text=True, timeout=COMPILE_TIMEOUT_S)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(path))


def load(source: Path, flags: tuple, declare, state: dict):
    """The library of `source` built with `flags` (plus -fopenmp when the compiler has it), once
    per process: its state is kept in the caller's dict `state` ("lib": the CDLL, or a string
    saying why there is none; "openmp": whether it was built with OpenMP). declare(lib) sets the
    argument and return types of its functions."""
    if state:  # every GEMV call asks: no lock once loaded
        return state["lib"]
    with _lock:
        if state:
            return state["lib"]
        compiler = os.environ.get("CC") or "cc"
        if shutil.which(compiler) is None:
            state["lib"] = f"no C compiler ({compiler!r} not found)"
            return state["lib"]
        text = source.read_bytes()
        why = ""
        for tried in (flags + ("-fopenmp",), flags):  # OpenMP when the compiler has it
            key = hashlib.sha256(text + repr((compiler, tried, machine())).encode())
            try:
                lib = build(compiler, source, tried, cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so")
            except subprocess.TimeoutExpired:
                why = f"the C compiler did not finish in {COMPILE_TIMEOUT_S} s"
                continue
            except subprocess.CalledProcessError as e:
                why = f"the C compiler failed: {(e.stderr.strip().splitlines() or [str(e)])[-1]}"
                continue
            except OSError as e:
                why = f"the compiled library did not load: {e}"
                continue
            declare(lib)
            state["lib"], state["openmp"] = lib, "-fopenmp" in tried
            return lib
        state["lib"] = why
        return why
