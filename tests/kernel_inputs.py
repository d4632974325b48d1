"""Inputs shared by the kernel tests (test_kernels.py, test_kernels_types.py)."""

import numpy as np
import torch


def random_x(rng, k, dtype, device, sparsity):
    """x (k,) standard normal in dtype and the fp32 threshold that drops that fraction of it
    (sparsity 0: -1, nothing dropped; 1: above max |x|, everything dropped)."""
    x = torch.from_numpy(rng.standard_normal(k).astype(np.float32)).to(device=device, dtype=dtype)
    if sparsity >= 1.0:
        t = x.abs().max().float() + 1
    elif sparsity == 0.0:
        t = torch.tensor(-1.0)
    else:
        t = torch.quantile(x.abs().float().cpu(), sparsity)
    return x, torch.as_tensor(t, dtype=torch.float32).to(device)


def rms_norm_inputs(rng, x: torch.Tensor, parts: int, eps: float) -> tuple:
    """What a folded RMSNorm's test gives the GEMV for an input x (K,): gamma (K,) fp32 (1 + 0.3 N(0, 1), as the
    runtime keeps it), x's sums of squares as `parts` partial sums (any partition, as a reduction writes them) and the
    input normed in torch with their rstd, in x's dtype."""
    k = x.shape[0]
    gamma = torch.from_numpy(1 + 0.3 * rng.standard_normal(k).astype(np.float32)).to(x.device)
    sq = torch.stack([(x[i::parts].float() ** 2).sum() for i in range(parts)])
    normed = ((x.float() * (1.0 / torch.sqrt(sq.sum() / k + eps))) * gamma).to(x.dtype)
    return gamma, sq, normed


def min_part(qw) -> torch.Tensor:
    """-dmin*m of every weight of a Q4_K QuantizedWeight (its blocks with all quants zeroed), (N, K) float32."""
    from spqt.checkpoint import QuantizedWeight

    blocks = qw.blocks.clone()
    blocks[..., 16:] = 0
    return QuantizedWeight(blocks, qw.fmt, qw.layout, qw.shape).dequantize()


def assert_within_fp32_sum(y, w_ref, w_mag, x_used, what, input_eps=0.0):
    """|y - W x| within the worst case of a GEMV in fp32: (K + 4) 2^-24 times the sum of the
    magnitudes the kernel adds (w_mag: per weight, (N, K) float64), plus input_eps times the same
    sum (the kernel's rounding of each product's factors), plus one rounding to y's dtype;
    reference w_ref (N, K) float64 times x_used."""
    ref = w_ref @ x_used.double()
    magnitude = w_mag @ x_used.double().abs()  # x_used (K,) or (K, M), y (N,) or (N, M)
    out_eps = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[y.dtype]
    tol = ((w_ref.shape[1] + 4) * 2.0**-24 + input_eps) * magnitude + out_eps * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    assert not torch.isnan(y).any(), f"{what}: NaN in output (an element not written?)"
    worst = int((err / tol).argmax())
    got, want = float(y.flatten()[worst]), float(ref.flatten()[worst])
    assert not (err > tol).any(), (f"{what}: {int((err > tol).sum())} of {y.numel()} outside tolerance; worst at "
                                   f"{worst}: got {got:.6g}, want {want:.6g}")


def assert_kept_residual_finish(gw, x, ws, kw: dict, what: str) -> None:
    """MODE_KEPT (on CUDA, kw its launch arguments with the threshold) with the residual added by the last program of
    each output tile: y poisoned, the arrival counters back at zero, y = MODE_KEPT's plain output + the residual."""
    from spqt.kernels import gemv as kg

    plain = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw).float().clone()
    r = torch.randn(gw.shape[0], device="cuda") * (plain.abs().mean() + 1e-3)
    r = r.to(x.dtype)  # x's dtype, as y's: one more rounding of y (bf16: 8 bits)
    ws.y.fill_(float("nan"))
    y = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw, fused=True, residual=r).float()
    assert not ws.counters.any(), f"{what}: the arrival counters are not reset"
    unit = 2e-3 if x.dtype == torch.float16 else 1e-2
    torch.testing.assert_close(y, plain + r.float(), rtol=unit, atol=unit * float(plain.abs().max()) + 1e-3,
                               msg=f"{what} residual")


def guarded_out(shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A poisoned (NaN) contiguous (N, K) output and the poisoned 256 rows after it in the same buffer (a superblock
    row's worth: a kernel's unmasked padding rows or columns land there, not past the allocation): (out, guard)."""
    n, k = shape
    buf = torch.full((n + 256, k), float("nan"), dtype=dtype, device=device)
    return buf[:n], buf[n:]


def assert_gemm_route(lin, x, calls: list, monkeypatch) -> None:
    """lin.dense(x) (several tokens) runs the GEMM whose calls are counted in `calls` once; with SPQT_PREFILL_GEMM=
    dequant it does not, and dequantize + matmul gives the same product within their roundings (2e-3, or two of x's
    type's units in the last place where more: bf16's; relative and of the largest output: y's rounding on each side,
    the dequantized weights')."""
    import os

    before = len(calls)
    fused = lin.dense(x).clone()
    assert len(calls) == before + 1 and fused.shape == (*x.shape[:-1], lin.n)
    setting = os.environ.get("SPQT_PREFILL_GEMM")
    monkeypatch.setenv("SPQT_PREFILL_GEMM", "dequant")
    plain = lin.dense(x)
    assert len(calls) == before + 1
    tol = max(2e-3, 2 * torch.finfo(x.dtype).eps)
    torch.testing.assert_close(fused.float(), plain.float(), rtol=tol, atol=tol * float(plain.abs().max()))
    if setting is None:
        monkeypatch.delenv("SPQT_PREFILL_GEMM")
    else:
        monkeypatch.setenv("SPQT_PREFILL_GEMM", setting)
