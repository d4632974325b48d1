"""Triton kernels compiled for Hopper without a GPU (compile_sm90: zigzag_mma's, zigzag_types', gemm_q4k's), and
their SASS read with Triton's bundled nvdisasm and cuobjdump: the listing, the registers and stack, the
instructions of the main loop. For scripts and tests."""

import re
import subprocess
import tempfile
from pathlib import Path


def tool(name: str) -> str:
    """Path of one of Triton's bundled CUDA tools (ptxas, nvdisasm, cuobjdump)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sm90(kernel, signature: dict, constants: dict, divisible: int, options: dict):
    """`kernel` (a triton.jit function) compiled for Hopper (sm_90) here, without a GPU (Triton's bundled ptxas):
    signature maps each argument to its Triton type or "constexpr", constants the constexprs to their values, the
    first `divisible` arguments are taken as multiples of 16 (as a launch specializes them), options are Triton's
    (num_warps, ...). The compiled object: .asm["ttgir"], ["ptx"], ["cubin"]. Needs TRITON_INTERPRET unset."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(kernel, signature, constants, attrs={(i,): [["tt.divisibility", 16]] for i in range(divisible)})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def disassemble(cubin: bytes) -> tuple[str, int, int]:
    """(nvdisasm's listing, registers a thread, stack bytes a thread) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return sass, int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def instructions(sass: str) -> list[str]:
    """The instruction lines of an nvdisasm listing."""
    return [ln for ln in sass.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]


def loops(sass: str) -> list[list[str]]:
    """The instruction lines of every loop of an nvdisasm listing (a backward branch closes one: from its target
    label to the branch), in the order their branches appear."""
    lines, labels, found = [], {}, []
    for ln in sass.splitlines():
        label = re.match(r"^(\.L_\w+):", ln.strip())
        if label:
            labels[label.group(1)] = len(lines)
        elif re.search(r"/\*[0-9a-f]{4}\*/", ln):
            lines.append(ln)
            target = re.search(r"BRA\s+(?:`\()?(\.L_\w+)", ln)
            if target and target.group(1) in labels:
                found.append(lines[labels[target.group(1)]:])
    return found


def main_loop(sass: str, containing: str = "") -> list[str]:
    """The instruction lines of the longest loop of an nvdisasm listing among those whose text contains
    `containing` (e.g. "HMMA": not an epilogue's loop)."""
    return max((loop for loop in loops(sass) if any(containing in ln for ln in loop)), key=len, default=[])


def opcode(line: str) -> str | None:
    """The mnemonic of an instruction line with its modifiers (LDG.E.128), its predicate dropped."""
    m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
    return m.group(1) if m else None
