"""CUDA C++ kernels compiled at run time by NVRTC and launched through the CUDA driver, both from
NVIDIA's `cuda-bindings` package (no compiler on the user's machine; `pip install spqt[cuda]`).

compile_cubin(source, options, arch) -> cubin bytes, cached in memory and on disk
(default_model.cache_dir()/cuda: $SPQT_CACHE/cuda, else $XDG_CACHE_HOME/spqt/cuda or ~/.cache/spqt/cuda; keyed by
the source, every compiler option and the NVRTC version; written to a temporary name and renamed).
Kernel(cubin, name) loads it into the current CUDA context; Kernel.launch(grid, block, args, stream, pdl)
enqueues one launch on a torch stream (capturable in a CUDA graph), args as (value, ctypes type) pairs; pdl:
programmatic dependent launch (sm_90), as Triton's launch_pdl.
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


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """NVRTC and the driver both usable (a GPU machine with cuda-bindings), and the driver at least
    NVRTC's major version (a cubin of NVRTC 13 does not load on a CUDA 12 driver)."""
    try:
        nvrtc = _nvrtc()
        driver = _driver()
    except NvrtcUnavailable:
        return False
    err, driver_version = driver.cuDriverGetVersion()  # e.g. 13000 for CUDA 13.0
    return int(err) == 0 and driver_version // 1000 >= nvrtc.nvrtcVersion()[1]


def _check(err, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")


def _cache_dir() -> Path:
    from spqt.default_model import cache_dir  # the CPU kernels' and the default model's cache root

    return cache_dir() / "cuda"


@functools.lru_cache(maxsize=None)
def compile_cubin(source: str, options: tuple, arch: str) -> bytes:
    """source compiled for arch ("sm_90") with options (tuple of str, e.g. "-DWARPS=4")."""
    nvrtc = _nvrtc()
    version = nvrtc.nvrtcVersion()[1:]
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17"] + [o.encode() for o in options]
    key = hashlib.sha256(repr((source, opts, version)).encode()).hexdigest()[:24]
    path = _cache_dir() / f"{key}.cubin"
    if path.is_file():
        return path.read_bytes()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"spqt.cu", 0, [], [])
    _check(err, "nvrtcCreateProgram")
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

    def __init__(self, cubin: bytes, name: str, large_clusters: bool = False):
        """large_clusters: allow clusters of more than 8 programs (sm_90: up to 16)."""
        driver = _driver()
        torch.cuda.init()
        err, self.module = driver.cuModuleLoadData(cubin)
        _check(err, "cuModuleLoadData")
        err, self.function = driver.cuModuleGetFunction(self.module, name.encode())
        _check(err, f"cuModuleGetFunction({name})")
        if large_clusters:
            (err,) = driver.cuFuncSetAttribute(
                self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1)
            _check(err, "cuFuncSetAttribute(NON_PORTABLE_CLUSTER_SIZE_ALLOWED)")
        self._driver = driver

    def blocks_per_sm(self, block: int, shared: int = 0) -> int:
        """Programs of `block` threads (and `shared` bytes of dynamic shared memory) an SM holds at once."""
        err, count = self._driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, block, shared)
        _check(err, "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        return int(count)

    def launch(self, grid: tuple, block: int, args: list, stream: torch.cuda.Stream, pdl: bool = False,
               cluster: tuple | None = None, shared: int = 0, cooperative: bool = False) -> None:
        """grid: (x, y) or (x, y, z) programs; args: (value, ctypes type) pairs in the kernel's parameter order
        (pointers as data_ptr() with POINTER, ints with INT, floats with FLOAT); cluster: (x, y) programs a thread
        block cluster (sm_90), dividing grid; shared: bytes of dynamic shared memory a program (at most 48 KB);
        cooperative: every program resident at once, or the launch fails (a grid whose programs wait on each other)."""
        driver = self._driver
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid[0], grid[1], grid[2] if len(grid) > 2 else 1
        config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
        config.sharedMemBytes = shared
        config.hStream = driver.CUstream(stream.cuda_stream)
        attrs = []
        if pdl:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            attrs.append(attr)
        if cluster is not None:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster[0], cluster[1], 1
            attrs.append(attr)
        if cooperative:
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            attr.value.cooperative = 1
            attrs.append(attr)
        if attrs:
            config.attrs = attrs
        config.numAttrs = len(attrs)
        values, types = zip(*args)
        (err,) = driver.cuLaunchKernelEx(config, self.function, (values, types), 0)
        _check(err, "cuLaunchKernelEx")


POINTER, INT, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
