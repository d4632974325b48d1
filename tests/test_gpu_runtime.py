"""The CUDA runtime (Triton kernels, CUDA graphs) against the CPU reference path. GPU only."""

import pytest
import torch

from spqt.checkpoint import load_spqt
from spqt.generate import Generator

pytestmark = pytest.mark.gpu


def test_graph_replay_equals_eager(tiny_spqt):
    from spqt.calibrate import calibrate

    loaded = load_spqt(tiny_spqt)
    calib = torch.randint(0, loaded.config.vocab_size, (2048,), generator=torch.Generator().manual_seed(0)).tolist()
    loaded.thresholds = calibrate(loaded, calib, [0.5], modes=("unified",), max_tokens=2048, ctx=256)
    prompt = [3, 17, 42, 5, 9]
    for s in (0.0, 0.5):
        graph = Generator(loaded, "cuda", sparsity=s, max_len=64)
        eager = Generator(loaded, "cuda", sparsity=s, max_len=64)
        eager.use_graph = False
        a = graph.generate(prompt, 40, track=False).tokens
        b = eager.generate(prompt, 40, track=False).tokens
        assert a == b, f"sparsity {s}: graph {a} vs eager {b}"


def _default_loaded(default_gguf):
    from spqt.default_model import default_spqt

    return load_spqt(default_spqt(progress=False))


# Largest top-1/top-2 logit gap of the CPU reference at which a sparse divergence is accepted: an
# activation within rounding of its threshold may be kept on one device and dropped on the other.
NEAR_TIE = 0.25


def _teacher_forced_logits(gen, ids, sparse):
    from spqt.generate import set_sparse

    with torch.inference_mode():
        gen.model.setup_cache(1, 96, gen.dtype)
        set_sparse(gen.model, sparse)
        dev = gen.device
        out = gen.model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev))[0].float().cpu()
        set_sparse(gen.model, False)
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_default_model_cuda_matches_cpu_reference(default_gguf, sparsity):
    """64 greedy tokens: CUDA path (Q4_K Triton kernels, CUDA graph, fp32 activations) == CPU
    reference path (a divergence is accepted only at a near-tie of the reference, below NEAR_TIE);
    teacher-forced logits of the fp32 CUDA path within 1 % of the logit range of the CPU reference,
    and, dense, of the fp16 CUDA path within 2 %. At 50 % the fp16 path is only reported: the 50 %
    model is this sensitive to which side of its threshold an activation falls on that the CPU
    reference itself moves by 9.9 logits in fp16, 13.2 in bf16, and 12.8 in fp32 with every
    threshold raised by 0.1 % (teacher-forced, same 51 positions; measured on the CPU, 2026-11-22)."""
    loaded = _default_loaded(default_gguf)
    prompt = [504, 1463, 282, 260, 2240, 5634, 3441, 281, 260, 5869, 5116]
    cpu = Generator(loaded, "cpu", sparsity=sparsity, max_len=96)
    ref = cpu.generate(prompt, 64, track=False).tokens
    gpu32 = Generator(loaded, "cuda", dtype=torch.float32, sparsity=sparsity, max_len=96)
    got = gpu32.generate(prompt, 64, track=False).tokens
    if got != ref:
        i = next(i for i, (x, y) in enumerate(zip(got, ref)) if x != y)
        again = Generator(loaded, "cpu", sparsity=sparsity, max_len=96)
        logits = []
        again.generate(prompt, i + 1, track=False, on_logits=logits.append)
        top = torch.topk(logits[i][0], 2).values
        margin = float(top[0] - top[1])
        print(f"sparsity {sparsity}: first difference at token {i}, reference margin {margin:.4f}")
        assert sparsity > 0 and margin < NEAR_TIE, f"divergence at token {i} with reference margin {margin:.4f}"
    else:
        print(f"sparsity {sparsity}: CUDA fp32 greedy tokens == CPU reference for all 64")
    ids = prompt + ref[:40]
    a = _teacher_forced_logits(cpu, ids, sparsity > 0)
    span = float(a.max() - a.min())
    for dtype, bound in ((torch.float32, 0.01), (torch.float16, 0.02)):
        gen = gpu32 if dtype == torch.float32 else Generator(loaded, "cuda", dtype=dtype, sparsity=sparsity, max_len=96)
        err = float((a - _teacher_forced_logits(gen, ids, sparsity > 0)).abs().max())
        print(f"sparsity {sparsity}: {dtype} CUDA vs fp32 CPU logits max |diff| {err:.4f}, range {span:.2f}")
        if dtype == torch.float32 or sparsity == 0:
            assert err < bound * span
