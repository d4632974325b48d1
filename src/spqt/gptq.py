"""Error-compensating quantization of the linear maps (GPTQ: Frantar et al. 2022, arXiv:2210.17323), for every
format and both layouts.

A map W (N, K) meets inputs x (K,). Over calibration inputs X (n, K) its quantized copy Q adds the output error
``sum over rows of (w - q) H (w - q)^T``, H = X^T X / n. The plain encoders (formats/) make each block's own
error small, whatever the inputs. Here the columns are quantized one at a time and the error each one leaves,
(w_j - q_j) / U[j, j], is taken off the columns still to come along row j of U, the upper Cholesky factor of
H^-1 (the optimal-brain-surgeon step): those columns absorb what column j lost, in proportion to how the inputs
correlate. The updates to far columns wait for the end of a batch of BATCH columns (GPTQ's lazy batches).

Blocks share scales, which the format's own encoder chooses (the reference or the mse search), from the values
as they stand when the batch starts: every earlier batch's errors are in them. Within a batch each weight is
rounded to the nearest point of the grid its block's scales define (``grid`` / ``with_codes`` of each format
module). Which columns one encoder call may serve depends on the layout:

* zigzag: a block is B rows of ONE column, so every column is free to go in any order. They go by decreasing
  H[j, j] (GPTQ's act order: the inputs with the most energy first, while the most columns are left to absorb
  their error), BATCH at a time, encoded at the batch's start.
* row: a block spans B columns of one row, so a batch is one block column (B columns, natural order),
  encoded at its start (GPTQ's groups).

The inputs are those of the float model, layer after layer, with the layers before already quantized (GPTQ's
sequential order): layer i's maps see what the quantized layers 0..i-1 give them. Each map keeps whichever of
this result and the plain encoder's has the lower ``tr((W - Q) H (W - Q)^T)`` on the calibration inputs.

Memory: one layer's float32 weights and H matrices at a time (quantize_layers asks for each layer when its turn
comes), beside the calibration states, (windows, 512, dim) float32 twice: for a 7B model about 0.8 GB of weights and
0.5 GB a copy of the states at the default 32,768 tokens (host memory, or GPU memory with --device cuda).
"""

from dataclasses import dataclass

import torch

from spqt.formats import codec, format_module, get_format
from spqt.layouts import blocks_to_matrix, check_layout, grid_shape, matrix_to_blocks

BATCH = 128  # zigzag columns per lazy batch (one encoder call, one block update of the columns after it)
DAMP = 0.01  # added to H's diagonal, as a share of its mean: H of a few thousand tokens can be singular
TOKENS = 32768  # calibration tokens, in windows of CTX
CTX = 512
WINDOWS_PER_PASS = 8  # windows a block runs at once


@dataclass
class MapResult:
    """One quantized map: its blocks (grid as layouts.py), and its output error on the calibration inputs,
    ``tr((W - Q) H (W - Q)^T)``, with this method and with the plain encoder (the lower one's blocks kept)."""

    blocks: torch.Tensor
    error: float
    plain_error: float
    shape: tuple  # W's (out_features, in_features)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / N: the mean over rows of the output's squared error on the inputs H stands for.
    w, q (N, K); h (K, K)."""
    diff = (w - q).to(h.dtype)
    return float(((diff @ h) * diff).sum() / w.shape[0])


def _upper_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, float64 (H^-1 = U^T U)."""
    h = h.to(torch.float64).clone()
    mean = float(h.diagonal().mean())
    h.diagonal().add_(damp * (mean if mean > 0 else 1.0))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def quantize_compensated(w: torch.Tensor, h: torch.Tensor, fmt: str, layout: str, search: str = "reference",
                         damp: float = DAMP, batch: int | None = None) -> torch.Tensor:
    """Quantize W with its errors compensated (module doc).

    w: (N, K) float; h: (K, K) float, X^T X / n of the map's inputs; batch: zigzag columns a batch (default
    BATCH). Returns uint8 blocks as quant.quantize does:
    (N, ceil(K/B), bytes) for row, (ceil(N/B), K, bytes) for zigzag, on w's device."""
    spec = get_format(fmt)
    check_layout(layout)
    module = format_module(fmt)
    encode, _ = codec(spec.name, search)
    size = spec.block_size
    n, k = w.shape
    rows, cols = grid_shape(layout, (n, k), size)
    padded_n, padded_k = (n, cols * size) if layout == "row" else (rows * size, k)
    device = w.device
    work = torch.zeros((padded_n, padded_k), dtype=torch.float32, device=device)
    work[:n, :k] = w
    hessian = torch.zeros((padded_k, padded_k), dtype=torch.float64, device=device)
    hessian[:k, :k] = h
    # an input that is always zero here (it may not be elsewhere), and a padding column, weighs as an average one:
    # its column is quantized plainly, its error moves nowhere (and the damping stays a share of the live inputs')
    dead = hessian.diagonal() == 0
    live = hessian.diagonal()[:k][~dead[:k]]
    hessian[dead, dead] = float(live.mean()) if live.numel() else 1.0
    if layout == "zigzag":
        order = torch.argsort(hessian.diagonal()[:k], descending=True, stable=True)
        step = batch or BATCH
    else:
        order = torch.arange(padded_k, device=device)
        step = size
    work = work[:, order]
    upper = _upper_factor(hessian[order][:, order], damp).to(torch.float32)
    out = torch.empty((rows, cols, spec.block_bytes), dtype=torch.uint8, device=device)
    for start in range(0, padded_k, step):
        stop = min(start + step, padded_k)
        part = work[:, start:stop]  # a view: the in-batch updates land in work
        blocks = encode(matrix_to_blocks(part, layout, size))
        scale, offset, codes = (blocks_to_matrix(t, layout, part.shape, size).contiguous() for t in module.grid(blocks))
        errors = torch.empty_like(part)
        for j in range(stop - start):
            x, s, o = part[:, j], scale[:, j], offset[:, j]
            level = torch.where(s != 0, torch.clamp(torch.round((x + o) / torch.where(s != 0, s, 1.0)), 0,
                                                    module.CODE_MAX), codes[:, j].float())
            codes[:, j] = level.to(torch.int64)
            err = (x - (s * level - o)) / upper[start + j, start + j]
            part[:, j + 1:] -= err[:, None] * upper[start + j, start + j + 1 : stop][None, :]
            errors[:, j] = err
        work[:, stop:] -= errors @ upper[start:stop, stop:]
        blocks = module.with_codes(blocks, matrix_to_blocks(codes, layout, size).to(torch.int64))
        if layout == "zigzag":
            out[:, order[start:stop]] = blocks.reshape(rows, stop - start, spec.block_bytes)
        else:
            out[:, start // size] = blocks
    return out


def quantize_map(w: torch.Tensor, h: torch.Tensor, fmt: str, layout: str, search: str = "reference",
                 damp: float = DAMP) -> MapResult:
    """The compensated blocks of W, or the plain encoder's where those have the lower output error on H."""
    from spqt.quant import dequantize, quantize

    compensated = quantize_compensated(w, h, fmt, layout, search, damp)
    plain = quantize(w, fmt, layout, search)
    h = h.to(torch.float64)
    error = output_error(w, dequantize(compensated, fmt, layout, tuple(w.shape)), h)
    plain_error = output_error(w, dequantize(plain, fmt, layout, tuple(w.shape)), h)
    return MapResult(compensated if error <= plain_error else plain, error, plain_error, tuple(w.shape))


def _quantize_maps(jobs: list, layout: str, search: str, damp: float, device: str) -> list:
    """quantize_map of each (w, h, fmt) in jobs, in order. A search a format lacks falls back to the reference (as
    the plain conversion does for a mix). On the CPU the maps go to one worker thread per core, each running its ops
    on one thread: the column loop's thousands of small ops ran 14x slower on torch's own two threads of the loaded
    2-core VM (a 1024x512 zigzag Q4_K map: 1.66 s against 0.12 s; quant.py says the same of the encoders)."""
    from concurrent.futures import ThreadPoolExecutor

    from spqt.formats import SEARCHES

    def work(job) -> MapResult:
        w, h, fmt = job
        served = SEARCHES[search]
        return quantize_map(w.to(device=device, dtype=torch.float32), h, fmt, layout,
                            search if served is None or fmt in served else "reference", damp)

    threads = torch.get_num_threads()
    if device != "cpu" or threads == 1:
        return [work(job) for job in jobs]
    try:  # one thread a worker, as checkpoint.quantize_source's
        with ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(work, jobs))
    finally:
        torch.set_num_threads(threads)  # new threads take their count from the last setting


def quantize_layers(config, embedding: torch.Tensor, layer_weights, calibration: torch.Tensor, types: dict,
                    layout: str, search: str = "reference", device: str = "cpu", damp: float = DAMP,
                    progress: bool = False):
    """Yield (layer i, {"layers.{i}.{group}": MapResult}) for every layer of a float model, in order.

    config: the model's ModelConfig; embedding: (vocab, dim) float; layer_weights(i): layer i's float weights
    (checkpoint.fused_layer_weights: "layers.{i}.{group}" stacked, norms, biases), asked for once, when layer i's
    turn comes, and dropped after it, so at most one layer's float weights are held beside the calibration states
    ((count, ctx, dim) float32, twice); calibration: (count, ctx) int64 windows of calibration text
    (calibrate.token_windows); types: "layers.{i}.{group}" -> format (mixes.group_types). Runs in float32 on the
    device."""
    from tqdm.auto import tqdm

    from spqt.model import causal_mask, layer_masks, layer_table, rope_tables, scaled_embedding

    calibration = calibration.to(device)
    length = calibration.shape[1]
    positions = torch.arange(length, device=device)
    # the tables as the Transformer holds them for a run of `length` tokens: RoPE's, the NoPE layers' identity, the
    # sliding layers' own (Transformer.rope_for); the masks as its forward makes them (a sliding layer's windowed)
    rope, identity, local = (None if t is None else t.to(device)
                             for t in rope_tables(config, config.max_seq_len, context=length))
    masks = layer_masks(config, causal_mask(positions, length, torch.float32, device), positions)
    with torch.no_grad():
        table = embedding.to(device=device, dtype=torch.float32)
        scale = (torch.tensor(config.embed_scale, dtype=torch.float32, device=device)
                 if config.embed_scale != 1.0 else None)
        states = [scaled_embedding(chunk, table, scale) for chunk in calibration.split(WINDOWS_PER_PASS)]
    del embedding, table  # (the caller's tensor is freed where it held no other reference)
    for i in tqdm(range(config.n_layers), desc="quantizing (GPTQ)", unit="layer", disable=not progress):
        inputs = (layer_table(config, i, rope, identity, local), positions, masks[i])
        results, states = _quantize_layer(config, i, layer_weights(i), states, inputs, calibration.numel(), types,
                                          layout, search, damp, device)
        yield i, results


def _quantize_layer(config, i: int, weights: dict, states: list, inputs: tuple, tokens: int, types: dict,
                    layout: str, search: str, damp: float, device: str) -> tuple[dict, list]:
    """Layer i's maps quantized on H gathered from states (its inputs: (windows, ctx, dim) float32 tensors), and the
    layer's outputs with those maps quantized: ({"layers.{i}.{group}": MapResult}, next states). Its float weights,
    block and H matrices are this function's alone, so they go when it returns. inputs: (rope, positions, mask)."""
    from spqt.generate import build_block
    from spqt.linear import Linear
    from spqt.model import KVCache
    from spqt.quant import dequantize

    groups = (("qkv", "attention"), ("o", "attention"), ("gate_up", "feed_forward"), ("down", "feed_forward"))
    length = inputs[1].shape[0]

    def run(block) -> list:
        out = []
        for x in states:
            if block.attention.cache is None or block.attention.cache.k.shape[0] != x.shape[0]:
                block.attention.cache = KVCache(x.shape[0], config.n_kv_heads, length, config.head_dim,
                                                torch.float32, device)
            out.append(block(x, *inputs))
        return out

    with torch.no_grad():  # not inference mode: quant.quantize's worker threads write the tensors it makes
        block = build_block(config, i, weights, device, torch.float32, "reference")
        hessians, handles = {}, []
        for group, parent in groups:
            lin = getattr(getattr(block, parent), group)
            hessians[group] = torch.zeros((lin.in_features, lin.in_features), dtype=torch.float64, device=device)

            def gather(mod, args, h=hessians[group]):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                h += (x.T @ x).double()
            handles.append(lin.input_tap.register_forward_pre_hook(gather))
        try:
            run(block)
        finally:
            for handle in handles:
                handle.remove()
        names = [f"layers.{i}.{group}" for group, _ in groups]
        results = dict(zip(names, _quantize_maps(
            [(weights[name], hessians[group] / tokens, types[name]) for name, (group, _) in zip(names, groups)],
            layout, search, damp, device)))
        for name, (group, parent) in zip(names, groups):
            fmt, result = types[name], results[name]
            old = getattr(getattr(block, parent), group)
            # the layers after this one see what the quantized map gives
            quantized = dequantize(result.blocks, fmt, layout, result.shape)
            setattr(getattr(block, parent), group,
                    Linear(quantized, torch.float32, device, "reference", bias=old.bias))
        return results, run(block)
