"""What the per-type tests of the CUDA GEMV (zigzag_q4k.cu; tests/test_q*_cuda.py) share on the CPU: the
register operations its fragment assembly uses (emulated bit for bit), the m16n8k16 product of emulated
fragments, the low-pair types' (Q3_K, Q2_K) level check, epilogue, tile pairs and emulation test, and the sm_90
compile check of one TYPE."""

import numpy as np
import pytest

from test_kernels_types import _random_blocks


def byte_perm(x: int, y: int, sel: int) -> int:
    """CUDA's __byte_perm without the sign modes: byte i of the result = byte (nibble i of sel) of y:x."""
    both = (y << 32) | x
    return sum(((both >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def fp16_halves(v: int) -> np.ndarray:
    """A 32-bit register's two fp16 (bits 0-15, 16-31) as float64."""
    return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)


def mma_kept_columns(a_regs: dict, b_of) -> np.ndarray:
    """The emulated mma of one chunk: (16 tiles m, 16 rows) float64, tile m's product A_m B_m at the column
    n = m // 2 the kernel keeps. a_regs[g, t, m]: lane (g, t)'s four A registers of tile m (a0 / a2 rows g,
    a1 / a3 rows g + 8); b_of(g, t, m): its four B values (slots 0-3). A (16 rows, k), B (k, 8 columns n = g),
    k = 2 t + slot (+ 6 for slots 2, 3)."""
    out = np.zeros((16, 16))
    for m in range(16):
        a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
        for g in range(8):
            for t in range(4):
                a0, a1, a2, a3 = a_regs[g, t, m]
                a_mat[g, 2 * t: 2 * t + 2], a_mat[g + 8, 2 * t: 2 * t + 2] = fp16_halves(a0), fp16_halves(a1)
                a_mat[g, 2 * t + 8: 2 * t + 10] = fp16_halves(a2)
                a_mat[g + 8, 2 * t + 8: 2 * t + 10] = fp16_halves(a3)
                b_mat[[2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9], g] = b_of(g, t, m)
        out[m] = (a_mat @ b_mat)[:, m // 2]
    return out


def assert_type_compiles(bits: int, b2_limits: tuple[int, int, int], assembly_max: int, regs_max: int,
                         tmp_path, monkeypatch) -> None:
    """TYPE `bits` of zigzag_q4k.cu compiles with NVRTC for sm_80 and sm_90 in each mode (MODE_KEPT with the folded
    norm), pipe, accumulator count and finish, cluster included, without spills, 16 mma in the main loop; the B2 loops
    (PIPE 0 plain, PIPE 1 fused, PIPE 0 cluster) hold at most b2_limits instructions; the plain one (16 accumulators)
    at most assembly_max permutes and logic ops and regs_max registers."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()
    nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 1, 2, bits=bits), "sm_80")
    dense, indexed, kept = zigzag_cuda.MODE_DENSE, zigzag_cuda.MODE_INDEXED, zigzag_cuda.MODE_KEPT
    plain, piped, clustered = b2_limits
    # (mode, pipe, epilogue, acc, cluster, norm, B2 loop limit); MODE_KEPT as the runtime's sparse_kept runs it on a
    # type's B2 entry (pipe 0: cuda_type_candidates), the norm folded, a residual map's last-program finish
    for mode, pipe, epilogue, acc, cluster, norm, limit in ((dense, 0, -1, 16, False, False, plain),
                                                            (dense, 1, 0, 16, False, False, piped),
                                                            (dense, 0, 2, 2, True, False, clustered),
                                                            (indexed, 0, 1, 16, False, False, None),
                                                            (indexed, 1, 2, 2, False, False, None),
                                                            (kept, 0, 1, 2, False, True, None)):
        options = zigzag_cuda.options(4, mode, pipe, epilogue, acc=acc, bits=bits, cluster=cluster, norm=norm)
        sass, regs, stack = disassemble(nvrtc.compile_cubin(source, options, "sm_90"))
        what = f"mode {mode} pipe {pipe} epilogue {epilogue} acc {acc} cluster {cluster} norm {norm}"
        assert stack == 0, f"{what}: {stack} bytes of stack (spills)"
        loop = main_loop(sass, "HMMA")
        assert sum("HMMA" in ln for ln in loop) == 16, what
        if limit is not None:
            assert len(loop) <= limit, f"{what}: B2 loop of {len(loop)} instructions"
        if (mode, pipe, acc) == (dense, 0, 16):
            assembly = sum(opcode(ln) in ("PRMT", "LOP3.LUT") for ln in loop)
            assert assembly <= assembly_max and regs <= regs_max, f"{assembly} permutes and logic ops, {regs} registers"
        if cluster:
            assert "UCGABAR_WAIT" in sass, "no cluster barrier in the cluster finish"


def assert_pairs_compile(bits: int, loop_max: int, regs_max: int) -> None:
    """TYPE `bits` (Q2_K, Q3_K) with tile pairs (-DPAIRS=1) at 8 accumulators compiles for sm_90 without spills in B2,
    B4 and the SwiGLU finish, 16 mma in the main loop; B2's loop at 8 and 4 warps holds at most loop_max instructions
    and regs_max registers, no select beyond 2 (none per tile) and 16 permutes at most (scales and B: none for the
    levels); at 2 accumulators PAIRS does not compile."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    source = zigzag_cuda.SOURCE.read_text()
    for warps, mode, epilogue in ((8, zigzag_cuda.MODE_DENSE, -1), (4, zigzag_cuda.MODE_DENSE, -1),
                                  (4, zigzag_cuda.MODE_INDEXED, 1), (4, zigzag_cuda.MODE_DENSE, 2)):
        sass, regs, stack = disassemble(nvrtc.compile_cubin(
            source, zigzag_cuda.options(warps, mode, 0, epilogue, ("-DPAIRS=1",), acc=8, bits=bits), "sm_90"))
        loop = main_loop(sass, "HMMA")
        assert stack == 0 and sum("HMMA" in ln for ln in loop) == 16, (bits, warps, mode, epilogue)
        if mode == zigzag_cuda.MODE_DENSE and epilogue == -1:
            ops = [opcode(ln) for ln in loop]
            assert len(loop) <= loop_max and ops.count("SEL") <= 2 and ops.count("PRMT") <= 16 and regs <= regs_max, (
                bits, warps, len(loop), ops.count("SEL"), ops.count("PRMT"), regs)
    with pytest.raises(Exception, match="PAIRS"):  # the low-pair types' at 8 accumulators only
        nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_DENSE, 0, -1, ("-DPAIRS=1",), acc=2,
                                                        bits=bits), "sm_90")


def assert_pair_levels(regs: list, levels: np.ndarray, row: int, cols_: list, g: int, t: int, m: int) -> None:
    """Lane (g, t)'s A registers of tile m in the low-pair formats (Q3_K, Q2_K) hold the levels (R, K, 256) of their
    rows and slots: regs[0] / regs[2] (slot pairs 0, 2) rows g, regs[1] / regs[3] rows g + 8, each half's level at
    bits 0 / 4 (even tiles) or 2 / 6 (odd tiles); cols_ the slots' columns."""
    shift = (2, 6) if m & 1 else (0, 4)
    for reg, h, pair in ((regs[0], 0, 0), (regs[1], 1, 0), (regs[2], 0, 2), (regs[3], 1, 2)):
        for half in (0, 1):
            c = cols_[pair + half]
            want = int(levels[row, c, 16 * m + 8 * h + g]) << shift[h]
            assert (reg >> (16 * half)) & 0xFFFF == want, (row, g, t, m, pair + half, h)


def parity_epilogue(a_regs: dict, b_of, odd_scale: tuple[float, float], bias: np.ndarray) -> np.ndarray:
    """The 256 outputs (float64) of a chunk whose lanes carry a B per tile parity (Q3_K, Q2_K): the emulated mma
    (mma_kept_columns), rows g / g + 8 of even tiles times 2^24 / 2^20 and of odd tiles times odd_scale, minus the
    offset term bias[parity, g] of output i (parity (i // 16) % 2, lane group i // 32)."""
    kept = mma_kept_columns(a_regs, b_of)  # (tile m, row)
    y = np.zeros(256)
    for m in range(16):
        scale = odd_scale if m & 1 else (2.0**24, 2.0**20)
        y[16 * m: 16 * m + 8] = kept[m, :8] * scale[0]
        y[16 * m + 8: 16 * m + 16] = kept[m, 8:] * scale[1]
    i = np.arange(256)
    return y - bias[(i >> 4) & 1, i >> 5]


# the low-pair types' tile pairs (PAIRS at ACC 8): the lane's half of B, the B permutes' selectors (slot parity, upper
# half) and the pair's second tile; the tests' broken variants change one each
PAIRS = {"upper": lambda g: (g >> 1) & 1, "sel": {(0, 0): 0x4410, (0, 1): 0x1044, (1, 0): 0x4432, (1, 1): 0x3244},
         "tile1": 4}


def _f16_bits(v: float) -> int:
    return int(np.float16(v).view(np.uint16))


def pairs_outputs(word, b_of, masks: tuple, odd_scale: tuple, bias: np.ndarray, kp: dict = PAIRS) -> np.ndarray:
    """The 256 outputs (float64) of a chunk at PAIRS, ACC 8 in the low-pair formats (Q2_K, Q3_K), as compute()'s
    parity_pairs_mma and program_sums() make them: pair (W, e, p) multiplies word(g, t, slot, W, p, e) (lane (g, t)'s
    register) masked for parity p (masks[p]: row g, row g + 8) by B in the lane's half kp["upper"](g) (b_of(g, t, p,
    slot): the fp16 value as float64), into c[4 W + 2 e + p]; its rows from lanes t = 2 W (tile T0 = 8 W + 2 e + p) and
    2 W + 1 (T0 + kp["tile1"]), registers e and 2 + e, times (2^24, 2^20) (even) or odd_scale; minus bias[parity, g]
    (output i: parity (i // 16) % 2, lane group i // 32). A row no pair writes stays NaN."""
    c = np.zeros((8, 16, 8))  # (accumulator, C rows, C columns)
    for wi in range(2):
        for e in range(2):
            for hs in range(2):
                for p in range(2):
                    mg, mg8 = masks[p]
                    a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
                    for g in range(8):
                        for t in range(4):
                            wa, wb = word(g, t, 2 * hs, wi, p, e), word(g, t, 2 * hs + 1, wi, p, e)
                            a_mat[g, 2 * t: 2 * t + 2] = fp16_halves(wa & mg)
                            a_mat[g + 8, 2 * t: 2 * t + 2] = fp16_halves(wa & mg8)
                            a_mat[g, 2 * t + 8: 2 * t + 10] = fp16_halves(wb & mg)
                            a_mat[g + 8, 2 * t + 8: 2 * t + 10] = fp16_halves(wb & mg8)
                            for k0, slot in ((2 * t, 2 * hs), (2 * t + 8, 2 * hs + 1)):
                                # the kernel's packed pair of slots (slot & ~1, slot | 1), permuted with zeros
                                packed = _f16_bits(b_of(g, t, p, slot & ~1)) | (_f16_bits(b_of(g, t, p, slot | 1)) << 16)
                                reg = byte_perm(packed, 0, kp["sel"][slot & 1, kp["upper"](g)])
                                b_mat[k0: k0 + 2, g] = fp16_halves(reg)
                    c[4 * wi + 2 * e + p] += a_mat @ b_mat
    y = np.full(256, np.nan)
    for a in range(8):
        wi, e, p = a >> 2, (a >> 1) & 1, a & 1
        scale = odd_scale if p else (2.0**24, 2.0**20)
        for t in (2 * wi, 2 * wi + 1):
            tile = 8 * wi + 2 * e + p + kp["tile1"] * (t & 1)
            for g in range(8):
                y[16 * tile + g] = c[a, g, 2 * t + e] * scale[0]
                y[16 * tile + 8 + g] = c[a, g + 8, 2 * t + e] * scale[1]
    i = np.arange(256)
    return y - bias[(i >> 4) & 1, i >> 5]


def check_pairs_emulation(rng, fmt: str, repack, emulate_pairs, emulation_error, kernel: dict, kp: dict,
                          broken: list[dict]) -> None:
    """The tile pairs' emulation (emulate_pairs(gw, x, row, k, kp)) through check_emulation: every superblock row's
    outputs as emulation_error(..., emulate=) requires; each broken variant of the pairs' constants kp fails on row 1."""
    for change in [None] + broken:
        kp_used = kp if change is None else dict(kp, **change)

        def pairs(gw, x, row, k, check_levels=True, kp_used=kp_used):
            return emulate_pairs(gw, x, row, k, kp_used)

        if change is None:
            check_emulation(rng, fmt, repack, lambda *a, **kw: emulation_error(*a, **kw, emulate=pairs), kernel, [])
        else:
            qw = _random_blocks(rng, fmt, (600, 19))
            x = rng.standard_normal(16).astype(np.float16)
            with pytest.raises(AssertionError):
                emulation_error(repack(qw, "cpu"), x, qw, 1, emulate=pairs)


def check_emulation(rng, fmt: str, repack, emulation_error, kernel: dict, broken: list[dict]) -> None:
    """The fragment emulation of one chunk (columns 0-15 of 19) on random `fmt` blocks of 1100 rows (5 superblock
    rows, the last 76 rows): emulation_error(gw, x, qw, row, kernel, check_levels) passes for every superblock
    row, and fails on row 1 for each broken variant (the kernel's constants with one changed)."""
    qw = _random_blocks(rng, fmt, (1100, 19))
    gw = repack(qw, "cpu")
    x = rng.standard_normal(16).astype(np.float16)  # the chunk's columns
    for row in range(gw.grid[0]):
        emulation_error(gw, x, qw, row, kernel)
    for change in broken:
        with pytest.raises(AssertionError):
            emulation_error(gw, x, qw, 1, dict(kernel, **change), check_levels=False)
