"""CUDA C++ kernels compiled at run time by NVRTC and launched through the CUDA driver, both from
NVIDIA's `cuda-bindings` package (no compiler on the user's machine; `pip install spqt[cuda]`).

compile_cubin(source, options, arch) -> cubin bytes, cached in memory and on disk
($SPQT_CACHE/cuda or ~/.cache/spqt/cuda, keyed by the source, options, arch and NVRTC version;
written to a temporary name and renamed). Kernel(cubin, name).launch(grid, block, args, stream,
pdl) enqueues one launch on a torch stream (capturable in a CUDA graph); pdl: programmatic
dependent launch (sm_90), as Triton's launch_pdl.
"""

import ctypes
import functools
import hashlib
import os
from pathlib import Path

import torch


class NvrtcUnavailable(RuntimeError):
    """cuda-bindings or the NVRTC library is missing: the caller falls back to Triton."""


@functools.lru_cache(maxsize=1)
def _nvrtc():
    """The NVRTC bindings (compiling needs no GPU or driver)."""
    try:
        from cuda.bindings import nvrtc
        _check(nvrtc.nvrtcVersion()[0], "nvrtcVersion")
    except Exception as exc:  # ImportError, or the library not found by cuda-pathfinder
        raise NvrtcUnavailable(f"NVRTC is not available ({exc}); pip install 'cuda-bindings' 'nvidia-cuda-nvrtc'") from exc
    return nvrtc


@functools.lru_cache(maxsize=1)
def _driver():
    """The CUDA driver bindings, initialized."""
    try:
        from cuda.bindings import driver
        _check(driver.cuInit(0)[0], "cuInit")
    except Exception as exc:
        raise NvrtcUnavailable(f"the CUDA driver is not reachable through cuda-bindings ({exc})") from exc
    return driver


def available() -> bool:
    """NVRTC and the driver both usable (a GPU machine with cuda-bindings)."""
    try:
        _nvrtc()
        _driver()
        return True
    except NvrtcUnavailable:
        return False


def _check(err, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")


def _cache_dir() -> Path:
    return Path(os.environ.get("SPQT_CACHE", Path.home() / ".cache" / "spqt")) / "cuda"


@functools.lru_cache(maxsize=None)
def compile_cubin(source: str, options: tuple, arch: str) -> bytes:
    """source compiled for arch ("sm_90") with options (tuple of str, e.g. "-DWARPS=4")."""
    nvrtc = _nvrtc()
    version = nvrtc.nvrtcVersion()[1:]
    key = hashlib.sha256(repr((source, options, arch, version)).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.cubin"
    if path.is_file():
        return path.read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"spqt.cu", 0, [], [])
    _check(err, "nvrtcCreateProgram")
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [o.encode() for o in options]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(err) != 0:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC could not compile the kernel: {log.decode(errors='replace')}")
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    _check(nvrtc.nvrtcGetCUBIN(prog, cubin)[0], "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(prog)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the compile next time
    return cubin


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


class Kernel:
    """One __global__ function of a cubin, loaded into the current CUDA context (torch's)."""

    def __init__(self, cubin: bytes, name: str):
        driver = _driver()
        torch.cuda.init()
        err, self.module = driver.cuModuleLoadData(cubin)
        _check(err, "cuModuleLoadData")
        err, self.function = driver.cuModuleGetFunction(self.module, name.encode())
        _check(err, f"cuModuleGetFunction({name})")
        self._driver = driver
        self._shared_allowed = 48 * 1024  # dynamic shared memory a launch may use without opting in

    def launch(self, grid: tuple, block: int, args: tuple, types: tuple, stream: torch.cuda.Stream,
               pdl: bool = False, shared: int = 0) -> None:
        """args: ints (pointers as data_ptr()) with their ctypes types (ctypes.c_void_p, c_int);
        shared: bytes of dynamic shared memory (above 48 KB the function opts in once)."""
        driver = self._driver
        if shared > self._shared_allowed:
            attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _check(driver.cuFuncSetAttribute(self.function, attr, shared)[0], "cuFuncSetAttribute")
            self._shared_allowed = shared
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid[0], grid[1], 1
        config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
        config.sharedMemBytes = shared
        config.hStream = driver.CUstream(stream.cuda_stream)
        if pdl:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            config.attrs = [attr]
            config.numAttrs = 1
        else:
            config.numAttrs = 0
        (err,) = driver.cuLaunchKernelEx(config, self.function, (args, types), 0)
        _check(err, "cuLaunchKernelEx")


POINTER, INT = ctypes.c_void_p, ctypes.c_int
