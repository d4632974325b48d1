"""The Llama runtime on the reference path: against transformers, and against itself."""

import pytest
import torch

from spqt.checkpoint import load_model
from spqt.generate import Generator, Sampling, build_model
from conftest import make_hf_checkpoint


def _hf_logits(folder, ids, **kw):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    ref.eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].float(), ref


def _our_logits(loaded, ids):
    model = build_model(loaded, "cpu", torch.float32)
    model.setup_cache(1, len(ids), torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_tiny_hf_model_matches_transformers(tmp_path, rng, scaling):
    folder = make_hf_checkpoint(tmp_path / "m", rope_scaling=scaling, seed=int(rng.integers(1 << 30)))
    loaded = load_model(folder)
    ids = rng.integers(0, loaded.config.vocab_size, 200).tolist()
    ours = _our_logits(loaded, ids)
    theirs, _ = _hf_logits(folder, ids)
    span = float(theirs.max() - theirs.min())
    err = float((ours - theirs).abs().max())
    assert err < 1e-4 * span, f"max |diff| {err:.3e} vs logit range {span:.2f}"


def test_prefill_then_decode_equals_full_forward_past_512(tiny_spqt, rng):
    """KV cache and RoPE positions: 600 tokens at once == 590 prefilled + 10 decoded one by one."""
    from spqt.checkpoint import load_spqt

    loaded = load_spqt(tiny_spqt)
    model = build_model(loaded, "cpu", torch.float32)
    ids = torch.from_numpy(rng.integers(0, loaded.config.vocab_size, (1, 600)))
    with torch.no_grad():
        model.setup_cache(1, 600, torch.float32)
        full = model(ids, torch.arange(600))
        model.setup_cache(1, 600, torch.float32)
        parts = [model(ids[:, :590], torch.arange(590), kv_len=590)]
        for p in range(590, 600):
            parts.append(model(ids[:, p : p + 1], torch.tensor([p]), kv_len=p + 1))
    stepped = torch.cat(parts, dim=1)
    err = float((full - stepped).abs().max())
    assert err < 1e-4 * float(full.abs().max()), f"max |diff| {err:.3e}"


def test_greedy_is_deterministic_and_sampling_follows_seed(tiny_spqt):
    from spqt.checkpoint import load_spqt

    loaded = load_spqt(tiny_spqt)
    gen = Generator(loaded, "cpu", max_len=64)
    a = gen.generate([1, 5, 9], 20).tokens
    b = gen.generate([1, 5, 9], 20).tokens
    assert a == b and len(a) == 20
    s1 = gen.generate([1, 5, 9], 20, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=3)).tokens
    s2 = gen.generate([1, 5, 9], 20, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=3)).tokens
    s3 = gen.generate([1, 5, 9], 20, Sampling(temperature=1.0, top_k=50, top_p=0.9, seed=4)).tokens
    assert s1 == s2 and s1 != s3


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_tiny_temperature_keeps_the_top_token(device):
    """Temperatures down to float32's smallest: the top token, never NaN probabilities (1e-37 overflowed logits / T;
    1e-40 made 1 / T inf on CUDA, which divides by multiplying with it; 1e-46 rounds to 0 in float32)."""
    from spqt.generate import sample

    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5)).to(device) * 8
    for temperature in (1e-46, 1e-40, 1e-37, 1e-30):
        tokens = sample(logits, Sampling(temperature=temperature, seed=1), torch.Generator(device).manual_seed(1))
        assert torch.equal(tokens, logits.argmax(-1)), temperature


def test_on_token_can_end_generation_and_finish_reason_says_why(tiny_spqt):
    from spqt.checkpoint import load_spqt

    gen = Generator(load_spqt(tiny_spqt), "cpu", max_len=64)
    full = gen.generate([1, 5, 9], 12)
    assert full.finish_reason == "length" and len(full.tokens) == 12
    seen = []
    cut = gen.generate([1, 5, 9], 12, on_token=lambda t: seen.append(t) or len(seen) == 5)
    assert cut.tokens == full.tokens[:5] == seen and cut.finish_reason == "stop"
    stopped = gen.generate([1, 5, 9], 12, stop_ids={full.tokens[3]})
    assert stopped.tokens == full.tokens[: full.tokens.index(full.tokens[3]) + 1]
    assert stopped.finish_reason == "stop"


def test_reuse_prefills_only_what_the_cache_does_not_hold(tiny_spqt, rng):
    """generate(reuse=True), a chat's next turn: the prompt's prefix that the last generation left in the KV cache
    (its prompt, and its new tokens but the last where they were decoded dense) is not computed again; the tokens
    and every step's logits are a fresh Generator's, within rounding."""
    from spqt.checkpoint import load_spqt

    loaded = load_spqt(tiny_spqt)
    gen, fresh = Generator(loaded, "cpu", max_len=96), Generator(loaded, "cpu", max_len=96)
    vocab = loaded.config.vocab_size
    first = rng.integers(0, vocab, 20).tolist()
    assert gen.generate(first, 8, reuse=True).cached_tokens == 0
    answer = gen.generate(first, 8, reuse=True)
    assert answer.cached_tokens == 19  # the same prompt again: all but its last token
    turn = first + answer.tokens + rng.integers(0, vocab, 6).tolist()
    computed = []
    forward = gen.model.forward
    gen.model.forward = lambda tokens, *a, **kw: computed.append(tokens.shape[1]) or forward(tokens, *a, **kw)
    ours, theirs = [], []
    reused = gen.generate(turn, 8, reuse=True, on_logits=ours.append)
    plain = fresh.generate(turn, 8, on_logits=theirs.append)
    assert reused.cached_tokens == 20 + 8 - 1 and computed[0] == len(turn) - reused.cached_tokens
    assert reused.tokens == plain.tokens and len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs):
        assert float((a - b).abs().max()) < 1e-4 * float(b.max() - b.min())
    assert fresh.generate(turn, 2).cached_tokens == 0  # reuse is asked for
    # a prompt that parts from the cache at position 5 reuses 5
    fork = turn[:5] + [(turn[5] + 1) % vocab] + turn[6:]
    assert gen.generate(fork, 2, reuse=True).cached_tokens == 5
    # sampled steps and a stop leave the prompt and every new token but the last
    sampled = gen.generate(first, 5, Sampling(temperature=0.8, seed=2), reuse=True).tokens
    assert gen.reusable_prefix(first + sampled + [1]) == 20 + 4
    stopped = gen.generate(first, 8, reuse=True, stop_ids={answer.tokens[2]}).tokens
    assert stopped[-1] == answer.tokens[2] and gen.reusable_prefix(first + stopped + [1]) == 20 + len(stopped) - 1
    # a new KV cache, or a caller's own decode step, leaves nothing to reuse
    gen.generate(first, 2, reuse=True)
    gen.model.setup_cache(1, gen.max_len, torch.float32)
    assert gen.reusable_prefix(first + [1]) == 0
    gen.generate(first, 2, reuse=True)
    gen.decode_step(1, len(first))
    assert gen.reusable_prefix(first + [1]) == 0
    # sparse steps do not write what a dense prefill would: only the prompt counts
    gen.set_sparsity(0.5, table=torch.full((loaded.config.n_layers, 4), 0.05))
    sparse = gen.generate(first, 6, reuse=True)
    assert gen.reusable_prefix(first + sparse.tokens + [1]) == len(first)


def test_suffix_captures_cover_every_rest_that_reuse_runs(tiny_spqt, monkeypatch):
    """The CUDA prefill's bookkeeping, without a GPU: capture_prefills(suffixes=True) runs one prefill per graph that
    a reused prefix's rest can ask for (a bucket up to SUFFIX_BUCKET_MAX over a span _kv_bucket gives), each ending at
    its span's end; with those captured, _reuse_pays says yes for exactly the rests that fit a captured graph, and
    past PREFILL_GRAPH_MAX always."""
    from spqt import generate as g
    from spqt.checkpoint import load_spqt

    gen = Generator(load_spqt(tiny_spqt), "cpu", max_len=300)
    gen.use_graph = True
    runs = []
    monkeypatch.setattr(gen, "_prefill", lambda prompt, start=0, capture=False: runs.append(
        (start, len(prompt) - start)) if capture else pytest.fail("a capture run that may not capture"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert gen.capture_prefills(299, suffixes=True) == 300
    slots = set()
    for start, m in runs[::2]:
        assert runs.count((start, m)) == 2  # an eager run, then the capture
        bucket = gen._prefill_bucket(m)
        keys = bucket if start == 0 else gen._kv_bucket(start + bucket - 1)
        assert bucket == m and (start == 0 or start + bucket == keys), (start, m)
        slots.add((bucket, keys))
    assert {b for b, k in slots if b == k} == {16, 32, 64, 128, 256, 300}  # whole prompts
    assert {(b, k) for b, k in slots if b != k} == {(b, k) for k in (256, 300) for b in (16, 32, 64, 128, 256) if b < k}
    gen._prefills, gen._prefill_key = dict.fromkeys(slots, object()), gen.model.cache_generation
    for n in range(2, 300):
        for start in range(1, n):
            bucket = gen._prefill_bucket(n - start)
            fits = bucket <= g.SUFFIX_BUCKET_MAX and start + bucket <= gen._kv_bucket(start + bucket - 1)
            assert gen._reuse_pays(n, start) == fits, (n, start)
    gen._prefills = {}  # none captured: only where the whole prompt would run eagerly
    monkeypatch.setattr(g, "PREFILL_GRAPH_MAX", 64)
    assert gen._reuse_pays(65, 1) and not gen._reuse_pays(64, 1)


def test_a_prefill_from_the_start_runs_causal_attention(tiny_spqt):
    """A CPU prefill of T tokens from position 0 over T keys marks its mask causal, and torch's attention then runs
    is_causal (blocks above the diagonal skipped): the logits are the explicit mask's within fp32 rounding; a
    prefill after cached keys (T < keys) keeps the explicit mask."""
    from spqt import functional
    from spqt.checkpoint import load_spqt

    gen = Generator(load_spqt(tiny_spqt), "cpu", max_len=300)
    seen, sdpa = [], []
    real, real_sdpa = functional.attention, functional.F.scaled_dot_product_attention
    functional.attention = lambda qkv, table, positions, k, v, h, kv, mask, length, **kw: seen.append(
        getattr(mask, functional.CAUSAL, False)) or real(qkv, table, positions, k, v, h, kv, mask, length, **kw)
    functional.F.scaled_dot_product_attention = lambda *a, **kw: sdpa.append(
        (kw["is_causal"], kw["attn_mask"] is None)) or real_sdpa(*a, **kw)
    try:
        tokens = torch.randint(0, 300, (1, 257), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            causal = gen.model(tokens, torch.arange(257), kv_len=257)
            explicit = gen.model(tokens, torch.arange(257), kv_len=258)  # a key past the tokens: the mask as is
            gen.model(tokens[:, 200:], torch.arange(200, 257), kv_len=257)
    finally:
        functional.attention, functional.F.scaled_dot_product_attention = real, real_sdpa
    n_layers = gen.loaded.config.n_layers
    assert seen == [True] * n_layers + [False] * (2 * n_layers)
    assert sdpa == [(True, True)] * n_layers + [(False, False)] * (2 * n_layers)  # what torch was asked
    span = float(explicit.max() - explicit.min())
    assert float((causal - explicit).abs().max()) < 1e-5 * span


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_masks_are_made_only_for_attention_that_reads_them(tiny_spqt, device, monkeypatch):
    """A CUDA decode token's attention runs in the fused kernels, which mask by position: the step makes no mask (its
    few kernels would sit in every captured step) and every layer gets None; a prefill, and every CPU forward, get the
    (T, keys) mask. Off the fused route a missing mask is an error, never a silent unmasked attention."""
    from spqt import functional
    from spqt.checkpoint import load_spqt

    gen = Generator(load_spqt(tiny_spqt), device, max_len=64)
    seen = []
    real = functional.attention

    def attention(qkv, table, positions, k, v, h, kv, mask, length, **kw):
        seen.append(None if mask is None else tuple(mask.shape))
        return real(qkv, table, positions, k, v, h, kv, mask, length, **kw)

    monkeypatch.setattr(functional, "attention", attention)
    tokens = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.inference_mode():
        gen.model.setup_cache(1, 64, gen.dtype)
        gen.model(tokens[:, :4], torch.arange(4, device=device), kv_len=4)
        gen.model(tokens[:, 4:], torch.arange(4, 5, device=device), kv_len=5)
    n_layers = gen.loaded.config.n_layers
    assert seen == [(4, 4)] * n_layers + [None if device == "cuda" else (1, 5)] * n_layers
    if device == "cuda":  # a span no fused kernel takes here (torch's route): the step makes its masks again
        from spqt.kernels import fused

        monkeypatch.setattr(fused, "ATTN_PER_HEAD_MAX", 3)
        monkeypatch.setattr(fused, "ATTN_LONG_FROM", 1 << 30)
        seen.clear()
        with torch.inference_mode():
            gen.model(tokens[:, 4:], torch.arange(4, 5, device=device), kv_len=5)
        assert seen == [(1, 5)] * n_layers
    monkeypatch.undo()
    cache = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="without a mask"):
        functional.attention(torch.randn(1, 1, 8 * 16), torch.ones(8, 16), torch.tensor([3]), cache, cache.clone(), 4,
                             2, None, 4)


def test_capped_attention_equals_its_definition(monkeypatch):
    """Gemma 2's soft-capped attention (functional.attention with softcap: scores made explicitly) against its
    definition in float64, softmax(cap tanh(q k^T / sqrt(hd) / cap) + mask) v with the kv heads repeated: grouped
    queries, a causal additive mask over cached keys and the same mask as bool (calibration's), queries in chunks of
    one or three rows (CAPPED_SCORES_MAX) the same within float32 rounding; a cap the scores exceed changes the
    output, and a huge one leaves torch's uncapped attention."""
    from spqt import functional
    from spqt.model import causal_mask

    g = torch.Generator().manual_seed(7)
    b, t, h, kv, hd, length = 2, 5, 6, 2, 16, 9
    qkv = 3 * torch.randn(b, t, (h + 2 * kv) * hd, generator=g)
    table = torch.cat([torch.ones(length, hd // 2), torch.zeros(length, hd // 2)], dim=-1)  # (no rotation)
    positions = torch.arange(length - t, length)
    mask = causal_mask(positions, length, torch.float32, "cpu")

    def run(cap, m=mask):
        caches = [torch.randn(b, kv, length, hd, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        return functional.attention(qkv, table, positions, *caches, h, kv, m, length, softcap=cap), caches

    got, (k, v) = run(2.0)
    q = qkv[..., :h * hd].reshape(b, t, h, hd).transpose(1, 2).double()
    keys, values = (x.double().repeat_interleave(h // kv, dim=1) for x in (k, v))
    scores = 2.0 * torch.tanh(q @ keys.transpose(-1, -2) / hd**0.5 / 2.0) + mask.double()
    want = (torch.softmax(scores, -1) @ values).transpose(1, 2)
    assert float((got.double() - want).abs().max()) < 1e-5
    assert torch.equal(run(2.0, mask == 0)[0], got)  # a bool mask (True: attend)
    for rows in (1, 3):
        monkeypatch.setattr(functional, "CAPPED_SCORES_MAX", rows * b * h * length)
        assert float((run(2.0)[0] - got).abs().max()) < 1e-5, rows  # (GEMMs of other shapes: other sum orders)
    monkeypatch.undo()
    plain = run(0.0)[0]
    assert float((plain - got).abs().max()) > 0.1
    assert float((run(1e6)[0] - plain).abs().max()) < 1e-5


def test_prompt_longer_than_context_is_refused(tiny_spqt):
    from spqt.checkpoint import load_spqt
    from spqt.errors import SpqtError

    gen = Generator(load_spqt(tiny_spqt), "cpu", max_len=16)
    with pytest.raises(SpqtError, match="exceed the context"):
        gen.generate(list(range(12)), 8)


@pytest.mark.slow
def test_default_model_matches_transformers_gguf(default_gguf):
    """Our float32 forward of the GGUF's weights == transformers' GGUF loading (dequantized fp32)."""
    from spqt.tokenizer import TextTokenizer

    loaded = load_model(default_gguf)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    text = ("The history of the city begins in the Roman era, when a small fort was built on the river. "
            "Over the following centuries the settlement grew into a market town, and by the twelfth century "
            "it had a cathedral, two markets and a bridge of stone. The bridge was rebuilt after the great flood "
            "of 1342, and its nine arches still carry the road to the north, where the old abbey stands.")
    ids = tok.encode(text)[:64]
    assert len(ids) == 64
    theirs, ref = _hf_logits(default_gguf.parent, ids, gguf_file=default_gguf.name)
    ours = _our_logits(loaded, ids)
    span = float(theirs.max() - theirs.min())
    err = float((ours - theirs).abs().max())
    print(f"max |diff| {err:.3e}, logit range {span:.2f}")
    assert err < 1e-3 * span
    # the same 32 greedy tokens
    gen = Generator(loaded, "cpu", max_len=128)
    ours_tokens = gen.generate(ids, 32).tokens
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert ours_tokens == out[0, 64:].tolist()


@pytest.mark.slow
def test_default_model_tokenizer_matches_transformers(default_gguf):
    from transformers import AutoTokenizer

    from spqt.tokenizer import TextTokenizer

    loaded = load_model(default_gguf)
    ours = TextTokenizer(loaded.tokenizer, loaded.config)
    theirs = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 )"
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ours.encode(text)) == text
    chat = ours.chat("Hi there")
    assert theirs.decode(chat).startswith("<|im_start|>system")


def test_norm_fold_is_taken_only_where_nothing_observes_it():
    """Linear hands a norm to its implementation's dense_normed (the GPU's folded RMSNorm) only for an input
    that carries sums of squares (functional.NORM_SUMS) and while no hook watches the norm or the map's input;
    a hooked module call drops the sums from its output (a hook may have changed it in place)."""
    from spqt import quantize
    from spqt.checkpoint import QuantizedWeight
    from spqt.direct_call import DirectCallModule
    from spqt.functional import NORM_SUMS
    from spqt.linear import Linear
    from spqt.model import RMSNorm

    w = torch.randn(64, 32)
    lin = Linear(QuantizedWeight(quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (64, 32)), torch.float32, "cpu")
    folded = []

    def dense_normed(x, weight, eps, sums, residual, swiglu):  # what the GPU's fold returns: W norm(x)
        folded.append(sums)
        return lin.impl.dense(torch.nn.functional.rms_norm(x, (32,), weight, eps))

    lin.impl.dense_normed = dense_normed
    norm = RMSNorm(32, 1e-5)
    x = torch.randn(1, 1, 32)
    want = lin(norm(x))
    assert torch.equal(lin(x, norm=norm), want) and not folded  # no sums: the module runs
    setattr(x, NORM_SUMS, torch.ones(1))
    torch.testing.assert_close(lin(x, norm=norm), want)
    assert len(folded) == 1
    seen = []
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(out))
    assert torch.equal(lin(x, norm=norm), want) and len(folded) == 1 and len(seen) == 1  # the hook saw the norm
    handle.remove()
    handle = lin.input_tap.register_forward_hook(lambda module, args, out: seen.append(out))
    assert torch.equal(lin(x, norm=norm), want) and len(folded) == 1 and len(seen) == 2
    handle.remove()

    class Tagging(DirectCallModule):
        def forward(self, t):
            out = t * 2
            setattr(out, NORM_SUMS, torch.ones(1))
            return out

    tagging = Tagging()
    assert hasattr(tagging(x), NORM_SUMS)
    tagging.register_forward_hook(lambda module, args, out: out.add_(1))  # changes the output in place
    assert not hasattr(tagging(x), NORM_SUMS)


def test_levels_reach_the_maps_as_written(tiny_spqt):
    """A level reaches each map as the number it is (0.65, not float32's 0.6499...), so a map whose crossover is that
    level runs sparse there (at 65 % such maps ran dense)."""
    from spqt.generate import sparse_linears

    loaded = load_model(tiny_spqt)
    gen = Generator(loaded, "cpu")
    gen.set_sparsity(0.65, table=torch.full((loaded.config.n_layers, 4), 0.3), criterion="teal")
    assert {lin.level for _, _, lin in sparse_linears(gen.model)} == {0.65}
    lin = next(lin for _, _, lin in sparse_linears(gen.model))
    lin.dense_fallback = True
    lin.impl.sparse_pays = lambda level, norm_fed=False: level >= 0.65  # a crossover of 0.65
    lin.sparse = True
    assert lin.runs_sparse()


@pytest.mark.parametrize("scaling", ["none", "llama3", "longrope"])
def test_partial_rope_table_rotates_the_leading_pairs_and_passes_the_rest(scaling):
    """rope_dims 12 of head_dim 16: the table's first 6 columns of each half are those of a 12-dimension head's table
    (frequencies over 12, its 6 factors, times the attention factor), the last 2 cos 1 and sin 0 exactly, unscaled.
    Whole heads (rope_dims 0 or head_dim) keep the table as it was before partial RoPE, bit for bit."""
    from spqt.config import ModelConfig
    from spqt.model import rope_table

    base = dict(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
    if scaling == "llama3":
        base["rope_scaling"] = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}
    if scaling == "longrope":
        base |= dict(rope_attention_factor=1.2, rope_original_context=64)
    factors = {} if scaling != "longrope" else {
        n: dict(rope_freq_factors=[1.0 + 0.1 * i for i in range(n // 2)],
                rope_long_freq_factors=[1.0 + 3.0 * i for i in range(n // 2)]) for n in (12, 16)}
    partial = ModelConfig(**base, head_dim=16, rope_dims=12, **factors.get(12, {}))
    alone = ModelConfig(**base, head_dim=12, **factors.get(12, {}))  # a head of the rotated dimensions alone
    for context in (40, 200):  # (longrope: both sides of the switch)
        table, theirs = rope_table(partial, 100, context), rope_table(alone, 100, context)
        assert torch.equal(table[:, :6], theirs[:, :6]) and torch.equal(table[:, 8:14], theirs[:, 6:])
        assert torch.equal(table[:, 6:8], torch.ones(100, 2)) and torch.equal(table[:, 14:], torch.zeros(100, 2))
    whole = ModelConfig(**base, head_dim=16, **factors.get(16, {}))
    assert ModelConfig(**base, head_dim=16, rope_dims=16, **factors.get(16, {})) == whole  # (read as 0: all)
    inv = 1.0 / (whole.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    if scaling == "longrope":
        inv = inv / torch.tensor(whole.rope_freq_factors, dtype=torch.float64)
    if scaling != "llama3":  # the table as rope_table made it before partial RoPE
        angles = torch.outer(torch.arange(100, dtype=torch.float64), inv)
        before = (torch.cat([angles.cos(), angles.sin()], dim=-1) * whole.rope_attention_factor).float()
        assert torch.equal(rope_table(whole, 100, 40), before)
    for bad in (7, 18, -2):
        with pytest.raises(ValueError, match=f"rope_dims must be an even integer in \\[0, head_dim 16\\].*{bad}"):
            ModelConfig(**base, head_dim=16, rope_dims=bad)


def test_rope_dim_order_pairs_the_rotated_dims_and_is_the_identity_for_whole_heads():
    """folding.rope_dim_order: our pair (i, i + hd/2) holds the source's (i, i + rot/2) for i < rot/2 and two
    passed-through dimensions above, every dimension once; rot 0 or hd: the identity."""
    from spqt.folding import rope_dim_order

    assert rope_dim_order(8, 6).tolist() == [0, 1, 2, 6, 3, 4, 5, 7]
    for hd, rot in ((16, 12), (128, 96), (16, 2), (16, 14)):
        order = rope_dim_order(hd, rot).tolist()
        assert sorted(order) == list(range(hd))
        pairs = [(order[i], order[i + hd // 2]) for i in range(hd // 2)]
        assert pairs[: rot // 2] == [(j, j + rot // 2) for j in range(rot // 2)]
        assert all(a >= rot and b >= rot for a, b in pairs[rot // 2:])
    for hd in (2, 16, 128):
        assert torch.equal(rope_dim_order(hd, 0), torch.arange(hd))
        assert torch.equal(rope_dim_order(hd, hd), torch.arange(hd))


@pytest.mark.parametrize("hd, rot", [(32, 16), (16, 16), (16, 12)])
def test_interleaved_rope_rows_rotate_as_transformers_glm4(hd, rot):
    """GLM-4's RoPE (transformers' Glm4: the first rot dimensions of each head rotated in the pairs (2j, 2j + 1) at
    frequency j over rot, the rest passed through): q and k with their head dimensions reordered by
    rope_dim_order(interleaved=True), rotated by our half-split table (rope_dims rot), equal transformers' rotated q and
    k reordered the same way, within float32 rounding, at positions up to 300; partial_rope_rows reorders every head's
    rows of wq / bq / wk / bk so, and leaves the other tensors alone."""
    from transformers import Glm4Config
    from transformers.models.glm4.modeling_glm4 import Glm4RotaryEmbedding, apply_rotary_pos_emb

    from spqt.config import ModelConfig
    from spqt.folding import partial_rope_rows, rope_dim_order
    from spqt.functional import _rope, _rotation
    from spqt.model import rope_table

    heads, t = 3, 300
    g = torch.Generator().manual_seed(hd + rot)
    q, k = torch.randn(1, heads, t, hd, generator=g), torch.randn(1, heads, t, hd, generator=g)
    theirs_config = Glm4Config(hidden_size=heads * hd, num_attention_heads=heads, num_key_value_heads=heads, head_dim=hd,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": rot / hd})
    positions = torch.arange(t)[None]
    cos, sin = Glm4RotaryEmbedding(theirs_config)(q, positions)
    theirs = apply_rotary_pos_emb(q, k, cos, sin)
    config = ModelConfig(vocab_size=32, dim=heads * hd, n_layers=1, n_heads=heads, n_kv_heads=heads, ffn_dim=32,
                         head_dim=hd, rope_dims=rot, max_seq_len=t)
    order = rope_dim_order(hd, rot, interleaved=True)
    assert sorted(order.tolist()) == list(range(hd))
    rows = _rotation(rope_table(config, t))[None, :, None]  # (1, T, 1, 2, hd)
    for x, want in zip((q, k), theirs):
        ours = _rope(x[..., order].transpose(1, 2), rows[..., 0, :], rows[..., 1, :]).transpose(1, 2)
        # transformers' angles p * f are float32 products (of a float32 f): each off by up to about 2 ulp of t
        atol = 2 * t * 2.0**-24 * 2 * float(x.abs().max())
        torch.testing.assert_close(ours, want[..., order], rtol=0, atol=atol)
    assert float((theirs[0] - q).abs().max()) > 0.1  # (the rotation moved q)
    w = torch.randn(heads * hd, 5, generator=g)
    loads = {"layers.0.wk": w, "layers.0.bq": w[:, 0], "layers.0.wv": w}
    load = partial_rope_rows(loads.__getitem__, config, interleaved=True)
    assert torch.equal(load("layers.0.wk"), w.reshape(heads, hd, 5)[:, order].reshape(w.shape))
    assert torch.equal(load("layers.0.bq"), w[:, 0].reshape(heads, hd)[:, order].reshape(-1))
    assert load("layers.0.wv") is w
