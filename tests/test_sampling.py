"""spqt.sampling: the logits' bias and penalties against a float64 reference written here, min-p's draws, generate's
choices against its own raw logits (greedy, host and CUDA paths), and Sampling's range checks."""

import pytest
import torch

from spqt.errors import SpqtError
from spqt.sampling import LogitShaper, Sampling, sample


def shaped_reference(logits: torch.Tensor, s: Sampling, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """logits (vocab,) -> float64, one token at a time: bias; repetition over prompt + answer; frequency and
    presence over the answer."""
    out = logits.double().clone()
    for token, bias in s.logit_bias.items():
        out[token] += bias
    for token in set(prompt) | set(answer):
        r = s.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token in set(answer):
        out[token] -= s.frequency_penalty * answer.count(token) + s.presence_penalty
    return out


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_shaper_matches_the_reference(device, rng):
    vocab = 1000
    for case in range(6):
        s = Sampling(repetition_penalty=float(rng.uniform(0.5, 2.0)) if case != 1 else 1.0,
                     frequency_penalty=float(rng.uniform(-2, 2)) if case != 2 else 0.0,
                     presence_penalty=float(rng.uniform(-2, 2)) if case != 3 else 0.0,
                     logit_bias={int(t): float(rng.uniform(-100, 100)) for t in rng.integers(0, vocab, 5)}
                     if case != 4 else {})
        prompt = rng.integers(0, vocab, 30).tolist()
        answer = rng.integers(0, vocab // 4, 40).tolist()  # (repeats: counts above 1)
        shaper = LogitShaper(s, prompt, vocab, device)
        for token in answer:
            shaper.add(torch.tensor([token], device=device) if token % 2 else token)
        logits = torch.from_numpy(rng.standard_normal((1, vocab)) * 5).float().to(device)
        before = logits.clone()
        got = shaper(logits)[0].cpu().double()
        want = shaped_reference(before[0].cpu(), s, prompt, answer)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), case
        assert torch.equal(logits, before)  # the caller's logits untouched (a graph's output buffer, say)
    plain = torch.randn(1, vocab).to(device)
    before = plain.clone()
    LogitShaper(Sampling(logit_bias={3: 5.0}, repetition_penalty=1.3), [3, 4], vocab, device)(plain)
    assert torch.equal(plain, before)


def filtered_reference(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (vocab,) -> the float64 distribution s samples from, as transformers' warpers define it: temperature
    first, then top-k (ties at the k-th kept), top-p (the fewest most likely tokens whose mass reaches it) and min-p
    (of the most likely token's probability after temperature), each renormalised."""
    probs = torch.softmax(logits.double() / s.temperature, -1)
    if s.top_k > 0:
        kth = probs.sort(descending=True).values[min(s.top_k, probs.numel()) - 1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if s.top_p < 1:
        mass_before = 0.0
        for i in probs.argsort(descending=True).tolist():
            mass_before, probs[i] = mass_before + probs[i] / probs.sum(), probs[i] if mass_before < s.top_p else 0.0
    probs = torch.where(probs >= s.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


def drawn(logits: torch.Tensor, s: Sampling, n: int, seed: int = 0) -> torch.Tensor:
    """The frequencies (vocab,) float64 of n draws of sample() from logits (vocab,), in one (n, vocab) batch."""
    draws = sample(logits.float().expand(n, -1), s, torch.Generator().manual_seed(seed))
    return torch.bincount(draws, minlength=logits.numel()).double() / n


def test_sampled_frequencies_are_the_filtered_distribution():
    """6,000 draws against filtered_reference: total variation under 0.04 (about 0.01 expected), tokens the filters
    drop never drawn. Each case is one where a wrong order would be 0.08 or more away (temperature applied after top-p
    or min-p, as llama.cpp's default chain does, or min-p of the distribution before temperature)."""
    logits = torch.tensor([0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02]).log()
    for s in (Sampling(1.0), Sampling(0.5), Sampling(2.0), Sampling(1.0, top_k=3), Sampling(1.0, top_k=100),
              Sampling(2.0, top_k=-1),  # (vLLM's "disabled", as 0)
              Sampling(1.0, top_p=0.6), Sampling(0.5, top_p=0.75), Sampling(0.5, top_p=0.8), Sampling(2.0, top_p=0.6),
              Sampling(2.0, min_p=0.5), Sampling(0.7, top_k=5, top_p=0.9, min_p=0.1)):
        got, want = drawn(logits, s, 6000), filtered_reference(logits, s)
        assert 0.5 * (got - want).abs().sum() < 0.04, (s, got, want)
        assert (got[want == 0] == 0).all(), (s, got, want)
    assert filtered_reference(logits, Sampling(0.5, top_p=0.75))[1] > 0.2  # (temperature last: 0.36 of the 2nd)
    assert filtered_reference(logits, Sampling(2.0, min_p=0.5)).count_nonzero() == 4  # (min-p before it: 2 tokens)
    masked = torch.tensor([1.0, float("-inf"), 0.0, float("-inf")])  # (a grammar's mask)
    got = drawn(masked, Sampling(1.0, top_p=0.99, min_p=0.01), 6000)
    assert got[1] == got[3] == 0 and abs(got[0] - torch.softmax(torch.tensor([1.0, 0.0]), -1)[0]) < 0.03
    for greedy in (0.0, 1e-30, 1e-45):
        assert (drawn(logits, Sampling(greedy), 100) == torch.eye(8)[0]).all(), greedy


def test_top_p_at_an_exact_tie_keeps_the_fewest_tokens():
    """Four equal logits (0.25 each, exact in float32) at top-p 0.5: two tokens reach 0.5, so two are drawn (a third
    was kept too, as the mass before it was not above top-p); top-p 0.75 keeps three; any top-p keeps the top token.
    Top-k's ties are all kept."""
    for top_p, kept in ((0.5, 2), (0.75, 3), (0.76, 4), (1e-9, 1)):
        got = drawn(torch.zeros(4), Sampling(1.0, top_p=top_p), 4000)
        assert got.count_nonzero() == kept and (got[got > 0] - 1 / kept).abs().max() < 0.05, (top_p, got)
    assert drawn(torch.tensor([0.0, 3.0, 1.0]), Sampling(1.0, top_p=1e-9), 100)[1] == 1
    # top-k keeps every token tied at the k-th, as transformers' and vLLM's (llama.cpp's keeps k of them)
    assert drawn(torch.tensor([1.0, 1.0, 1.0, 0.0]), Sampling(1.0, top_k=2), 1000).count_nonzero() == 3


def test_a_temperature_above_float32s_largest_value_is_uniform_over_the_allowed_tokens():
    """A temperature of 1e39 (finite in Python, inf in float32) divided a grammar's -inf logits into NaN: the sample
    raised (a traceback of `spqt generate --temperature 1e39 --json-schema-file`). Now it draws the allowed tokens
    evenly."""
    logits = torch.tensor([5.0, float("-inf"), -5.0, float("-inf")])
    for temperature in (1e39, 1e308):
        got = drawn(logits, Sampling(temperature), 4000)
        assert got[1] == got[3] == 0 and abs(got[0] - 0.5) < 0.05, (temperature, got)


def test_min_p_draws_only_tokens_above_its_share(rng):
    """min_p 0.4 over four tokens of probabilities 0.5, 0.3, 0.15, 0.05: the two below 0.2 never drawn, the others in
    their renormalised shares (0.625, 0.375) over 20,000 draws; at min_p 0.09 the last (0.05 against 0.045) is drawn."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seed = int(rng.integers(1 << 30))
    counts = drawn(probs[0].log(), Sampling(1.0, min_p=0.4), 20000, seed)
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0].item() == pytest.approx(0.625, abs=0.015) and counts[1].item() == pytest.approx(0.375, abs=0.015)
    assert drawn(probs[0].log(), Sampling(1.0, min_p=0.09), 4000, seed)[3] > 0


def test_sampling_refuses_out_of_range_values():
    for bad in (dict(min_p=1.5), dict(min_p=-0.1), dict(repetition_penalty=0.0), dict(repetition_penalty=float("inf")),
                dict(frequency_penalty=2.5), dict(presence_penalty=-3.0), dict(logit_bias={-1: 1.0}),
                dict(logit_bias={5: 100.5})):
        with pytest.raises(SpqtError):
            Sampling(**bad)
    for bad, message in ((dict(temperature=-1.0), "temperature >= 0 .*got -1.0"), (dict(top_p=0.0), "top-p .*got 0.0"),
                         (dict(top_p=1.5), "top-p .*got 1.5"), (dict(top_k=-2), "top-k .*got -2")):
        with pytest.raises(SpqtError, match=message):  # (each names its value: one message named all three)
            Sampling(**bad)
    with pytest.raises(SpqtError, match="vocabulary of 100"):
        LogitShaper(Sampling(logit_bias={100: 1.0}), [1], 100, "cpu")
    assert not Sampling(min_p=0.3, top_k=4).shapes_logits() and Sampling(presence_penalty=0.1).shapes_logits()


def test_a_tiny_repetition_penalty_keeps_the_logits_finite(rng):
    """A repetition penalty so small that a seen token's positive logit over it overflows float32 (1e-38), or that
    is 0 in float32 (1e-45, 5e-324), is in range: the shaped logits stay finite (an inf made the sample's
    probabilities NaN: a RuntimeError, a served request's 500), and greedy and sampled choices are seen tokens."""
    vocab, seen = 100, [3, 4]
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    for penalty in (1e-38, 1e-45, 5e-324):
        for extra in ({}, dict(frequency_penalty=-2.0, presence_penalty=-2.0)):
            s = Sampling(1.0, repetition_penalty=penalty, **extra)
            shaper = LogitShaper(s, seen, vocab, "cpu")
            shaper.add(3)
            logits = torch.from_numpy(rng.standard_normal((1, vocab)) * 5).float()
            logits[0, seen] = torch.tensor([8.0, 9.0])
            shaped = shaper(logits)
            assert torch.isfinite(shaped).all(), (penalty, extra)
            assert int(sample(shaped, Sampling(), None)) in seen and int(sample(shaped, s, gen)) in seen


def generate_against_its_logits(gen, prompt: list[int], s: Sampling, n: int) -> list[int]:
    """Generate with s, reading each step's raw logits (on_logits): each greedy token must be the argmax of the
    reference's shaping of them, given the tokens before it."""
    raw = []
    tokens = gen.generate(prompt, n, s, on_logits=lambda logits: raw.append(logits[0])).tokens
    assert len(raw) == len(tokens) == n
    for i, (logits, token) in enumerate(zip(raw, tokens)):
        want = shaped_reference(logits, s, prompt, tokens[:i])
        assert want[token] >= want.max() - 1e-3, (i, token, int(want.argmax()))  # (a near-tie may go either way)
    return tokens


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_generation_with_penalties_and_bias(device, tiny_spqt, rng):
    """Greedy choices under the penalties and a bias are the shaped argmax of each step's own logits; a bias of +100
    makes every token that token; without logprobs asked (CUDA's pipelined greedy graphs otherwise) the same tokens."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import Generator

    gen = Generator(load_spqt(tiny_spqt), device, max_len=64)
    penalised = Sampling(repetition_penalty=1.8, frequency_penalty=1.5, presence_penalty=0.5)
    changed = 0
    for prompt in [rng.integers(0, gen.loaded.config.vocab_size, 8).tolist() for _ in range(4)]:
        plain = gen.generate(prompt, 24).tokens
        tokens = generate_against_its_logits(gen, prompt, penalised, 24)
        changed += tokens != plain
        assert gen.generate(prompt, 24, penalised).tokens == tokens
    assert changed  # (the tiny model repeats itself greedy: the penalties change some of its answers)
    forced = Sampling(logit_bias={t: -100.0 for t in set(plain) - {7}} | {7: 100.0})
    assert generate_against_its_logits(gen, prompt, forced, 6) == [7] * 6
    sampled = Sampling(0.8, seed=3, repetition_penalty=1.3, logit_bias={7: -100.0})
    once, again = (gen.generate(prompt, 16, sampled).tokens for _ in range(2))
    assert once == again and 7 not in once


def test_sampled_generation_draws_from_each_steps_own_logits(tiny_spqt, rng):
    """A seeded sampled generation is sample() of each step's raw logits (on_logits) in turn, on one generator seeded
    with Sampling.seed: the same seed gives the same tokens, and another seed other tokens."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import Generator

    gen = Generator(load_spqt(tiny_spqt), "cpu", max_len=64)
    prompt = rng.integers(0, gen.loaded.config.vocab_size, 8).tolist()
    s = Sampling(1.2, top_k=40, top_p=0.95, min_p=0.01, seed=int(rng.integers(1 << 62)))
    raw = []
    tokens = gen.generate(prompt, 16, s, on_logits=raw.append).tokens
    replay = torch.Generator().manual_seed(s.seed)
    assert [int(sample(logits, s, replay)) for logits in raw] == tokens
    assert gen.generate(prompt, 16, s).tokens == tokens
    assert gen.generate(prompt, 16, Sampling(1.2, top_k=40, top_p=0.95, min_p=0.01, seed=s.seed + 1)).tokens != tokens
