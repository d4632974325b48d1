"""The runtime commands: generate, perplexity, calibrate through the CLI, and their errors
(one line on stderr, exit code 2)."""

import json
import os

import pytest

from spqt.cli import main
from conftest import ctrl_c_at_decode_step


def _error(capsys, argv, fragment):
    capsys.readouterr()  # drop what earlier calls printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error:") and fragment in err[0], err


def test_generate_with_penalties_is_the_generators(tiny_spqt, capsys, tmp_path):
    """generate's --repeat-penalty, --frequency-penalty, --presence-penalty and --min-p reach the Generator: the
    text is its answer under the same Sampling (the tiny model repeats itself greedy; the penalties change that)."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import Generator, Sampling
    from spqt.tokenizer import TextTokenizer

    record = tmp_path / "gen.json"
    flags = ["--repeat-penalty", "1.5", "--frequency-penalty", "1", "--presence-penalty", "0.5", "--min-p", "0.05"]
    assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "12", "--device", "cpu", *flags,
                 "--json", str(record)]) == 0
    got = json.loads(record.read_text())
    loaded = load_spqt(tiny_spqt)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    sampling = Sampling(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=0.5, min_p=0.05)
    want = Generator(loaded, "cpu", max_len=64).generate(tok.encode("once upon a time"), 12, sampling).tokens
    plain = Generator(loaded, "cpu", max_len=64).generate(tok.encode("once upon a time"), 12).tokens
    assert got["text"] == tok.decode(want) and want != plain
    assert got["sampling"]["repeat_penalty"] == 1.5 and got["sampling"]["min_p"] == 0.05


def test_generate_without_a_seed_samples_a_random_one_that_json_records(tiny_spqt, capsys, tmp_path):
    """Sampling without --seed draws a seed of its own (the default seed 0 gave every run the same text, where llama.cpp
    and transformers sample anew); --json and the stats line give it, and that seed given back repeats the text."""
    def run(*extra: str) -> dict:
        assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "6", "--device", "cpu",
                     "--temperature", "1.5", "--json", str(record), *extra]) == 0
        return json.loads(record.read_text())

    record = tmp_path / "gen.json"
    first, second = run(), run()
    assert first["sampling"]["seed"] != second["sampling"]["seed"]  # (two draws of 63 bits)
    again = run("--seed", str(first["sampling"]["seed"]))
    assert again["text"] == first["text"] and again["sampling"]["seed"] == first["sampling"]["seed"]
    assert run("--seed", "-3")["sampling"]["seed"] == -3
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("| seed -3")  # (on the stats line, as llama.cpp)
    assert run("--temperature", "0")["sampling"]["seed"] is None  # (greedy: no seed to record)
    assert "seed" not in capsys.readouterr().err


def test_generate_streams_and_reports(tiny_spqt, capsys, tmp_path):
    """stdout holds the generated text alone (as `> out.txt` would keep it); the model line, the
    timing and the sparsity go to stderr; --json writes the same text with the figures."""
    record = tmp_path / "gen.json"
    assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "8", "--device", "cpu",
                 "--json", str(record)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(record.read_text())
    assert captured.out == doc["text"] + "\n" and doc["text"]
    assert "once upon a time" not in captured.out and "tokens/s" not in captured.out and "[" not in captured.out
    err = captured.err.splitlines()
    from spqt.kernels import cpu_native

    gemv = "fp16-gemv" if cpu_native.available() else "native-gemv"  # native wherever a C compiler works
    assert any(line.startswith(f"[q4_k-zigzag, cpu {gemv}, sparsity 0]") for line in err), err
    assert any("decode:" in line and "tokens/s" in line for line in err), err
    assert doc["prompt_tokens"] > 0 and 1 <= doc["generated_tokens"] <= 8
    assert doc["prefill_tokens_per_s"] > 0 and doc["decode_tokens_per_s"] > 0
    assert doc["mode"] == "dense" and doc["achieved_sparsity"] is None and doc["kind"] == "q4_k-zigzag"
    assert [p.name for p in tmp_path.iterdir()] == ["gen.json"]  # no temporary left behind


def test_generate_leaves_the_end_token_out_of_the_text(tiny_spqt, capsys, tmp_path):
    """The end token that ends a generation is not text of the answer: stdout and --json's text hold the words
    alone (a grammar that admits only "yes" forces the end token right after it; the token count keeps it)."""
    from spqt.checkpoint import load_spqt
    from spqt.tokenizer import TextTokenizer

    loaded = load_spqt(tiny_spqt)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    record = tmp_path / "gen.json"
    for chat in ([], ["--chat"]):
        capsys.readouterr()
        assert main(["generate", str(tiny_spqt), "-p", "the quick", "-n", "20", "--grammar", 'root ::= "yes"',
                     "--device", "cpu", *chat, "--json", str(record)]) == 0
        doc = json.loads(record.read_text())
        assert capsys.readouterr().out == "yes\n" and doc["text"] == "yes", doc["text"]
        assert doc["finish_reason"] == "stop" and doc["generated_tokens"] == len(tok.encode("yes")) + 1


def test_generate_on_a_stdout_that_cannot_be_written_is_one_error_line(tiny_spqt, capsys, monkeypatch):
    """stdout on a full disk (`spqt generate ... > /dev/full`: ENOSPC as the first token is written) is one error
    line and exit 2, not a traceback."""
    import errno
    import io

    class Full(io.TextIOBase):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    capsys.readouterr()
    monkeypatch.setattr("sys.stdout", Full())
    assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "spqt: error: [Errno 28] No space left on device", err
    assert not any("Traceback" in line for line in err), err


def test_generate_from_a_closed_standard_input_is_one_error_line(tiny_spqt, capsys, monkeypatch):
    """`spqt generate -f - <&-` (stdin closed: Python's sys.stdin is None) is one error line, exit 2."""
    monkeypatch.setattr("sys.stdin", None)
    _error(capsys, ["generate", str(tiny_spqt), "-f", "-", "--device", "cpu"],
           "cannot read the prompt file -: standard input is closed")


def test_generate_with_stdout_or_stderr_closed(tiny_spqt, capsys, monkeypatch):
    """`spqt generate ... >&-` (Python's sys.stdout None) is no traceback: exit 0, its text goes nowhere; with stderr
    closed (`2>&-`), the model line and figures go nowhere either, not into stdout, which holds the text alone."""
    argv = ["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "4", "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    with monkeypatch.context() as patch:
        patch.setattr("sys.stdout", None)
        assert main(argv) == 0
    assert "Traceback" not in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setattr("sys.stderr", None)
        assert main(argv) == 0
    assert capsys.readouterr().out == text


def test_generate_runs_and_reports_the_tuned_route(tiny_spqt, capsys, monkeypatch, tmp_path):
    """Where the decode steps run MODE_KEPT (Generator.kept_runs: here forced, a CPU has none), generate decodes without
    counting the achieved sparsity (counting takes the collected path) and records it in --json; it says so on stderr,
    naming the tuned route where that is what runs. kept_runs / tuned_route_runs themselves: nothing where MODE_KEPT
    cannot run (kept_possible); SPQT_SPARSE_KEPT's setting where set, else the tuned route; the tuned route reported
    only when it is what runs and the steps do not count."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import DENSE_STEP_FORCED, Generator, sparse_linears

    tracked = []
    real_generate = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **kw: tracked.append(kw["track"]) or real_generate(
        self, *a, **kw))
    record = tmp_path / "gen.json"
    for kept, tuned, line in (("all", "all", "every sparse map in one launch each"),
                              ("plain", None, "SPQT_SPARSE_KEPT=plain asks"), (None, None, None)):
        monkeypatch.setattr(Generator, "kept_runs", lambda self: kept)
        monkeypatch.setattr(Generator, "tuned_route_runs", lambda self, track=False: tuned)
        capsys.readouterr()
        assert main(["generate", str(tiny_spqt), "-p", "hi", "-n", "2", "--device", "cpu", "--json", str(record)]) == 0
        err = capsys.readouterr().err
        assert ("in one launch" in err) == (line is not None) and (line is None or line in err)
        assert json.loads(record.read_text())["one_launch_route"] == kept
    assert tracked == [False, False, True]
    monkeypatch.undo()
    monkeypatch.setattr(Generator, "_tuned_kept_route", lambda self, sparsity: "all")
    gen = Generator(load_spqt(tiny_spqt), "cpu")
    assert gen.kept_route == "all" and not gen.kept_possible()  # a CPU: the collected path whatever the route
    assert gen.kept_runs() is None and gen.tuned_route_runs() is None
    monkeypatch.setattr(Generator, "kept_possible", lambda self: True)
    for setting, runs, tuned in (("", "all", "all"), ("0", None, None), ("plain", "plain", None), ("1", "all", None)):
        monkeypatch.setenv("SPQT_SPARSE_KEPT", setting)
        assert gen.kept_runs() == runs and gen.tuned_route_runs() == tuned, setting
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "")
    assert gen.tuned_route_runs(track=True) is None
    gen.kept_route = "off"
    assert gen.kept_runs() is None and gen.tuned_route_runs() is None
    gen.kept_route = "dense"  # a level whose sparse steps were slower: every map dense, nothing in one launch
    assert gen.kept_runs() is None and gen.tuned_route_runs() is None
    assert gen.dense_step_reason() is None  # dense itself (sparsity 0): no level to run dense
    gen.sparsity = 0.5
    for layer, kind, lin in sparse_linears(gen.model):
        lin.set_threshold(0.1, level=0.5)
    every = [f"layers.{layer}.{kind}" for layer, kind, _ in sparse_linears(gen.model)]
    monkeypatch.setattr(Generator, "dense_fallbacks", lambda self: every)
    assert "spqt tune --routes timed" in gen.dense_step_reason()
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "off")
    assert gen.dense_step_reason() is None
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "dense")  # forced, whatever the route and wherever MODE_KEPT cannot run
    gen.kept_route = "off"
    monkeypatch.setattr(Generator, "kept_possible", lambda self: False)
    assert gen.dense_step_reason() == DENSE_STEP_FORCED
    monkeypatch.setattr(Generator, "dense_fallbacks", lambda self: every[1:])  # a map sparse (--no-dense-fallback
    assert gen.dense_step_reason() is None  # leaves none dense): not every map dense, no reason


def test_generate_reports_the_dense_step_route(tiny_spqt, capsys, monkeypatch):
    """Where every map of the level runs dense (Generator.dense_step_reason: faked, a CPU has no step routes), generate
    says so and why, not the crossover's line, and does not count the achieved sparsity (a kernel a map, to count
    nothing, in a step meant to run as fast as the dense one)."""
    from spqt.generate import Generator

    tracked = []
    real_generate = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, *a, **kw: tracked.append(kw["track"]) or real_generate(
        self, *a, **kw))
    for reason, line in (("spqt tune --routes timed it", "every linear map runs dense: spqt tune --routes timed it"),
                         (None, "their sparse kernel")):
        monkeypatch.setattr(Generator, "dense_fallbacks", lambda self: ["layers.0.qkv", "layers.0.o"])
        monkeypatch.setattr(Generator, "dense_step_reason", lambda self: reason)
        capsys.readouterr()
        assert main(["generate", str(tiny_spqt), "-p", "hi", "-n", "2", "--device", "cpu"]) == 0
        err = capsys.readouterr().err
        assert line in err and ("every linear map runs dense" in err) == (reason is not None)
    assert tracked == [False, True]


def test_generate_gemv_choice(tiny_spqt, capsys):
    """--gemv fp32 runs the torch reference on the CPU (the label says which GEMV ran)."""
    assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "4", "--device", "cpu",
                 "--gemv", "fp32"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("[q4_k-zigzag, cpu, sparsity 0]") for line in err), err


def test_generate_json_reports_achieved_sparsity(tiny_spqt, capsys, tmp_path):
    """At a sparsity level the record carries the achieved sparsity per input kind."""
    from spqt.checkpoint import load_spqt, save_spqt

    model = load_spqt(tiny_spqt)
    n_layers = model.config.n_layers
    model.thresholds = {"unified": {"0.5": [[0.05, 0.05, 0.05, 0.05]] * n_layers}}
    sparse_model = tmp_path / "sparse.spqt"
    save_spqt(model, sparse_model)
    record = tmp_path / "gen.json"
    assert main(["generate", str(sparse_model), "-p", "hello world", "-n", "6", "--device", "cpu",
                 "--sparsity", "0.5", "--json", str(record)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(record.read_text())
    assert captured.out == doc["text"] + "\n"
    assert "achieved sparsity" in captured.err and "achieved" not in captured.out
    achieved = doc["achieved_sparsity"]
    assert set(achieved) == {"qkv", "o", "gate_up", "down", "all"} and 0 < achieved["all"] < 1, achieved


def test_generate_errors(tiny_spqt, capsys, tmp_path):
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hello " * 3000, "-n", "8", "--device", "cpu"], "exceed the model's context")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--device", "tpu"], "unknown device")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--sparsity", "1.5", "--device", "cpu"], "sparsity must be in")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--sparsity", "0.5", "--device", "cpu"], "no teal unified thresholds")
    _error(capsys, ["generate", str(tmp_path / "nope.spqt"), "-p", "hi"], "no such file")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "", "--device", "cpu"], "the prompt is empty")  # no model line


def test_generate_reads_the_prompt_from_a_file_and_takes_a_system_message(tiny_spqt, capsys, tmp_path, monkeypatch):
    """-f FILE gives -p's tokens (one trailing newline dropped, as llama.cpp drops it; - reads stdin); --system puts
    a system message before the prompt in the chat template (and needs --chat); a file that cannot be read, -p with
    -f: one error line."""
    import io

    def tokens(*argv) -> dict:
        record = tmp_path / "r.json"
        assert main(["generate", str(tiny_spqt), *argv, "-n", "3", "--device", "cpu", "--json", str(record)]) == 0
        capsys.readouterr()
        return json.loads(record.read_text())

    plain = tokens("-p", "once upon a time")
    (tmp_path / "p.txt").write_text("once upon a time\n", encoding="utf-8")
    from_file = tokens("-f", str(tmp_path / "p.txt"))
    assert (from_file["prompt"], from_file["prompt_tokens"], from_file["text"]) == (
        "once upon a time", plain["prompt_tokens"], plain["text"])
    monkeypatch.setattr("sys.stdin", io.StringIO("once upon a time"))
    assert tokens("-f", "-")["text"] == plain["text"]
    chat, system = tokens("-p", "hi", "--chat"), tokens("-p", "hi", "--chat", "--system", "be brief")
    assert system["prompt_tokens"] > chat["prompt_tokens"] and system["system"] == "be brief"
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--system", "x", "--device", "cpu"], "it needs --chat")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--thinking-budget", "4", "--device", "cpu"],
           "it needs --chat")
    record = tmp_path / "budget.json"  # (tiny's template writes no thinking: a note, the same answer)
    assert main(["generate", str(tiny_spqt), "-p", "hi", "-n", "3", "--chat", "--thinking-budget", "4", "--device",
                 "cpu", "--json", str(record)]) == 0
    assert "--thinking-budget bounds nothing" in capsys.readouterr().err
    budgeted = json.loads(record.read_text())
    assert (budgeted["text"], budgeted["thinking_budget"], chat["thinking_budget"]) == (chat["text"], 4, None)
    _usage_error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--chat", "--thinking-budget", "-1"],
                 "at least 0")
    _error(capsys, ["generate", str(tiny_spqt), "-f", str(tmp_path / "none.txt"), "--device", "cpu"],
           "cannot read the prompt file")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    _error(capsys, ["generate", str(tiny_spqt), "-f", str(tmp_path / "bad.txt"), "--device", "cpu"],
           "cannot read the prompt file")
    _usage_error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "-f", str(tmp_path / "p.txt")], "not allowed with")
    from spqt.checkpoint import load_spqt
    from spqt.errors import SpqtError
    from spqt.tokenizer import TextTokenizer

    loaded = load_spqt(tiny_spqt)  # a template that takes no system message (Mistral's raise_exception)
    loaded.tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system "
                                      "role') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    assert tok.chat("hi")
    with pytest.raises(SpqtError, match="chat template refused this conversation: no system role"):
        tok.chat("hi", "be brief")


def _usage_error(capsys, argv, fragment):
    """An argparse error: exit code 2, its message on stderr's last line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_found_by_a_qa_sweep(tiny_spqt, capsys, tmp_path):
    """Each of these printed a traceback, ran on silently, or failed only after the whole job (the twenty-seventh
    session's sweep of the CLI): now one line and exit 2, before any slow work where the input says enough."""
    model = str(tiny_spqt)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox. " * 50)
    for t in ("nan", "inf"):
        _error(capsys, ["generate", model, "-p", "hi", "-n", "2", "--temperature", t, "--device", "cpu"],
               "finite temperature")
    _error(capsys, ["generate", model, "-p", "hi", "-n", "2", "--temperature", "1", "--seed", str(2**70),
                    "--device", "cpu"], "the seed must be in")
    for flag, value, fragment in (("--repeat-penalty", "0", "repetition penalty must be"),
                                  ("--frequency-penalty", "3", "frequency penalty must be in"),
                                  ("--presence-penalty", "-2.5", "presence penalty must be in"),
                                  ("--min-p", "1.5", "min-p must be in")):
        _error(capsys, ["generate", model, "-p", "hi", "-n", "2", flag, value, "--device", "cpu"], fragment)
    _error(capsys, ["perplexity", model, "--data", str(binary), "--device", "cpu"], "not UTF-8 text")
    _error(capsys, ["calibrate", model, "--data", str(binary), "--device", "cpu"], "not UTF-8 text")
    _error(capsys, ["calibrate", model, "--data", str(tmp_path), "--device", "cpu"], "is a folder, not a text file")
    for argv, fragment in ((["perplexity", model, "--data", str(text), "--ctx", "-5"], "--ctx: must be at least 4"),
                           (["perplexity", model, "--data", str(text), "--chunks", "0"], "--chunks: must be at least 1"),
                           (["perplexity", model, "--data", str(text), "--batch", "0"], "--batch: must be at least 1"),
                           (["calibrate", model, "--data", str(text), "--tokens", "-5"], "--tokens: must be at least 1"),
                           (["calibrate", model, "--data", str(text), "--greedy-tokens", "0"], "must be at least 1"),
                           (["bench", "decode", "--new-tokens", "-1"], "--new-tokens: must be at least 4"),
                           (["bench", "decode", "--prompt-tokens", "0"], "--prompt-tokens: must be at least 1"),
                           (["tune", "--routes", "x", "--new-tokens", "3"], "--new-tokens: must be at least 4"),
                           (["serve", model, "--ctx", "0"], "--ctx: must be at least 2")):
        _usage_error(capsys, argv, fragment)
    # the output's folder checked before the job, named as missing (not a ".probe" file)
    missing = tmp_path / "nodir"
    _error(capsys, ["calibrate", model, "--data", str(text), "-o", str(missing / "c.spqt")],
           f"the folder {missing} does not exist")
    _error(capsys, ["calibrate", model, "--data", str(text), "--json", str(tmp_path)], "it is a directory")
    _error(capsys, ["perplexity", model, "--data", str(text), "--json", str(missing / "p.json")], "does not exist")
    # a quantize onto its own source would have replaced it (a GGUF's first bytes: the old code read on and failed later)
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + bytes(range(256)))
    _error(capsys, ["quantize", str(source), "-o", str(source)], "is also the source: write it to another path")
    assert source.read_bytes() == b"GGUF" + bytes(range(256))
    source.unlink()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    _error(capsys, ["quantize", str(loop), "-o", str(tmp_path / "q.spqt")], "no such file or directory")
    loop.unlink()
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    _error(capsys, ["generate", str(fake), "-p", "hi"], "not a GGUF file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "notes.gguf", "text.txt"]  # nothing written


def test_an_empty_sparsity_list_is_a_usage_error(tiny_spqt, capsys, tmp_path):
    """--sparsity "" (or ",") parsed as no levels: perplexity ended in an IndexError traceback after the whole
    evaluation, and calibrate computed nothing and wrote the model back with its thresholds dropped, exit 0."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox. " * 50)
    before = tiny_spqt.read_bytes()
    for levels in ("", ",", " , "):
        _usage_error(capsys, ["perplexity", str(tiny_spqt), "--data", str(text), "--sparsity", levels],
                     f"argument --sparsity: expected comma-separated numbers, got {levels!r}")
        _usage_error(capsys, ["calibrate", str(tiny_spqt), "--data", str(text), "--sparsity", levels],
                     "argument --sparsity: expected comma-separated numbers")
    assert tiny_spqt.read_bytes() == before


def test_an_error_quoting_another_librarys_lines_is_one_line(tiny_hf, capsys, monkeypatch):
    """An HF folder whose tokenizer transformers cannot build (a Llama folder without tokenizer files and no
    sentencepiece): its ValueError lists the causes on five lines, which the error line quoted as they were."""
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) a class.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    _error(capsys, ["inspect", str(tiny_hf)], "cannot load its tokenizer (ValueError: Couldn't instantiate the backend "
           "tokenizer from one of: (1) a file, (2) a class.)")


def test_a_checkpoint_without_a_vocabulary_is_refused(tiny_hf, capsys, tmp_path):
    """A Qwen2 folder of config.json and safetensors alone: transformers 5 builds a Qwen2 tokenizer without its files,
    a vocabulary of one special token, and quantize wrote a model whose every prompt encoded to nothing
    (generate: "the prompt is empty")."""
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_hf / name).read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    _error(capsys, ["quantize", str(folder), "-o", str(tmp_path / "q.spqt")], "its tokenizer encodes no text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_model_written_under_a_gguf_name_is_refused(tiny_hf, tiny_spqt, capsys, tmp_path):
    """quantize -o m.gguf (llama.cpp's habit) wrote a .spqt under that name, which every command then read as a GGUF
    and refused ("not a GGUF file"): a model that does not load. Now one line before any work, nothing written."""
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox. " * 50)
    _error(capsys, ["quantize", str(tiny_hf), "-o", str(tmp_path / "m.gguf")],
           "is named .gguf, but spqt writes a .spqt")
    _error(capsys, ["calibrate", str(tiny_spqt), "--data", str(text), "-o", str(tmp_path / "c.GGUF")],
           "is named .gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["calib.txt"]


def test_quantize_into_a_file_of_its_source_folder_is_refused(tiny_hf, capsys, tmp_path):
    """quantize FOLDER -o FOLDER/model.safetensors replaced the checkpoint's weights with the .spqt and exited 0 (the
    folder then "lacks tensors"), perplexity FOLDER --json FOLDER/tokenizer.json its tokenizer: only the folder itself
    was compared with the output."""
    folder = tmp_path / "hf"
    folder.mkdir()
    for f in tiny_hf.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = (folder / "model.safetensors").read_bytes()
    _error(capsys, ["quantize", str(folder), "-o", str(folder / "model.safetensors")],
           "model.safetensors is also the source's file")
    _error(capsys, ["quantize", str(folder), "-o", str(folder / "config.json")], "is also the source's file")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox. " * 50)
    _error(capsys, ["perplexity", str(folder), "--data", str(text), "--json", str(folder / "tokenizer.json")],
           "is also the model's file")
    assert (folder / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_hf.iterdir())
    assert (folder / "tokenizer.json").read_bytes() == (tiny_hf / "tokenizer.json").read_bytes()


def test_text_from_a_pipe_and_from_a_device(tiny_spqt, capsys, tmp_path):
    """--data <(zcat text.gz) (a pipe, /dev/fd/N) and --data /dev/null were "no such file" though both exist: a pipe
    is now read, a device refused as what it is."""
    import threading

    pipe = tmp_path / "fifo"
    os.mkfifo(pipe)

    def feed():
        with open(pipe, "w") as f:
            f.write("the quick brown fox jumps over the lazy dog. " * 40)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    capsys.readouterr()
    try:
        assert main(["perplexity", str(tiny_spqt), "--data", str(pipe), "--ctx", "64", "--chunks", "1",
                     "--device", "cpu"]) == 0
    finally:
        if writer.is_alive():  # the command did not read it: open it here, so the writer ends
            os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=60)
    assert "1 chunk of 64 tokens" in capsys.readouterr().out
    _error(capsys, ["perplexity", str(tiny_spqt), "--data", os.devnull], "/dev/null is not a text file (a device")


def test_every_model_preparation_option_has_a_help_text():
    """quantize's --layout, calibrate's --sparsity and --device and perplexity's --method and --device showed no help
    at all (not what they take, nor their defaults)."""
    from spqt.cli import build_parser

    parser = build_parser()
    for command in ("quantize", "calibrate", "perplexity", "inspect"):
        silent = [a.dest for a in parser.subcommands[command]._actions if not a.help]
        assert not silent, f"spqt {command}: no help for {silent}"


def test_calibrate_of_a_float_model_refuses_an_output_model(tiny_hf, capsys, tmp_path):
    """calibrate FOLDER --json T.json -o M.spqt wrote the JSON alone and exited 0: -o was ignored without a word (a
    float model has no .spqt to write the thresholds into)."""
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox. " * 50)
    _error(capsys, ["calibrate", str(tiny_hf), "--data", str(text), "--json", str(tmp_path / "t.json"), "-o",
                    str(tmp_path / "m.spqt")], "thresholds live in a .spqt file: quantize the model first")
    assert [p.name for p in tmp_path.iterdir()] == ["calib.txt"]


def test_an_output_that_is_an_input_is_refused(capsys, tmp_path, monkeypatch):
    """generate / perplexity / calibrate wrote --json or -o over the model, the data or the prompt they read, and
    exited 0 (the fiftieth session's sweep): now one line and exit 2 before any work, and the file is kept. Paths
    compared as files (./x, links); calibrate -o naming the model itself stays the in-place default."""
    model = tmp_path / "m.spqt"
    model.write_bytes(b"model bytes")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox. " * 50)
    link = tmp_path / "link.spqt"
    link.symlink_to(model)
    for argv, fragment in (
            (["generate", str(model), "-p", "hi", "--json", str(link)], "--json"),
            (["generate", str(model), "-f", str(text), "--json", str(text)], "is also the prompt file"),
            (["generate", str(model), "-p", "hi", "--thresholds", str(text), "--json", str(text)],
             "is also the --thresholds file"),
            (["perplexity", str(model), "--data", str(text), "--json", str(model)], "is also the model"),
            (["perplexity", str(model), "--data", str(text), "--json", str(text)], "is also the --data file"),
            (["calibrate", str(model), "--data", str(text), "-o", str(text)], "is also the --data file"),
            (["calibrate", str(model), "--data", str(text), "--json", str(model)], "is also the model"),
            (["calibrate", str(model), "--data", str(text), "-o", str(model), "--json", str(link)],
             "is also the output --json"),
            (["calibrate", str(model), "--data", str(text), "--json", str(tmp_path / "x.json"), "-o",
              str(tmp_path / "x.json")], "the output -o")):
        _error(capsys, argv, fragment)
    hard = tmp_path / "hard.spqt"  # a hard link: another name, the same file
    os.link(model, hard)
    _error(capsys, ["perplexity", str(model), "--data", str(text), "--json", str(hard)], "is also the model")
    _error(capsys, ["bench", "gemv", "--json", str(tmp_path / "b.out"), "--plot", str(tmp_path / "b.out")],
           "the output --plot")
    monkeypatch.setenv("SPQT_CACHE", str(tmp_path / "cache"))  # no MODEL: the default model's (unconverted) path
    from spqt.default_model import default_spqt_path

    _error(capsys, ["generate", "-p", "hi", "--json", str(default_spqt_path())], "is also the model")
    assert model.read_bytes() == b"model bytes" and text.read_text() == "the quick brown fox. " * 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.spqt", "link.spqt", "m.spqt", "t.txt"]


def test_an_output_onto_a_pipe_or_a_device_writes_into_it(tiny_spqt, capsys, tmp_path):
    """--json or -o naming a FIFO, /dev/null or /dev/stdout: the temporary file was renamed onto it, which replaced
    the pipe or device node with a regular file (as root, `spqt quantize SRC -o /dev/null` replaced /dev/null
    itself). Now it is written into, and stays what it was."""
    import errno
    import stat
    import threading

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    pipe = tmp_path / "fifo"
    os.mkfifo(pipe)
    got = []

    def read():
        with open(pipe, "rb") as f:
            got.append(f.read())

    def release(reader):
        """Let a reader that nothing was written to end (open the pipe for writing, then close it), and join it. A
        reader that has just closed its end is alive still for a moment, and the pipe then has no reader, so that
        open fails with ENXIO (the failure seen once in the sixty-second session): nothing to release then."""
        if reader.is_alive() and stat.S_ISFIFO(os.stat(pipe).st_mode):
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
        reader.join(timeout=10)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert main(["perplexity", str(tiny_spqt), "--data", str(text), "--ctx", "64", "--chunks", "1",
                     "--device", "cpu", "--json", str(pipe)]) == 0
    finally:
        release(reader)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode), "the pipe was replaced by a file"
    assert json.loads(got[0])["results"][0]["chunks"] == 1
    reader = threading.Thread(target=read, daemon=True)  # a .spqt (safetensors renames a file of its own onto a path)
    reader.start()
    try:
        assert main(["calibrate", str(tiny_spqt), "--data", str(text), "--tokens", "64", "--mode", "unified",
                     "--sparsity", "0.5", "--held-out-tokens", "0", "--device", "cpu", "-o", str(pipe)]) == 0
    finally:
        release(reader)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode), "the pipe was replaced by a file"
    assert len(got) == 2 and len(got[1]) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "text.txt"]


def test_a_failed_model_write_is_one_line(tmp_path):
    """A .spqt write that fails inside safetensors (a file size limit here, as a full disk) ended in its traceback:
    now SpqtError "cannot write ...", the temporary file removed and an older file at the path kept."""
    import subprocess
    import sys

    target = tmp_path / "m.spqt"
    target.write_text("older")
    code = ("import resource, torch\n"
            "from safetensors.torch import save_file\n"
            "from spqt.checkpoint import atomic_write\n"
            "from spqt.errors import SpqtError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "try:\n"
            f"    atomic_write({str(target)!r}, lambda tmp: save_file({{'w': torch.ones(1 << 16)}}, tmp))\n"
            "except SpqtError as e:\n"
            "    print('error:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"error: cannot write {target}: "), (out.stdout, out.stderr)
    assert target.read_text() == "older" and [p.name for p in tmp_path.iterdir()] == ["m.spqt"]


def test_a_closed_pipe_ends_the_command_quietly(tiny_spqt, tmp_path):
    """`spqt inspect m.spqt | head -0`: a block-buffered stdout (no PYTHONUNBUFFERED) met the gone reader only at
    the interpreter's exit ("Exception ignored ... BrokenPipeError", exit 120); main flushes it, exit 141, no noise."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "spqt.cli", "inspect", str(tiny_spqt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.close()  # the reader leaves before the command writes (its imports take a second)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_a_closed_stdout_stops_quietly(capsys, monkeypatch):
    """`spqt generate ... | head -c 1`: the reader gone, the next write raised BrokenPipeError through main (a
    traceback, exit 1); now no output and exit 141, as a tool that SIGPIPE ended."""
    import spqt.cli as cli

    def gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_inspect", gone)
    capsys.readouterr()
    assert cli.main(["inspect", "x.spqt"]) == 141
    assert capsys.readouterr().err == ""


def test_an_unknown_option_is_shown_with_its_subcommand_usage(capsys):
    """argparse reported a subcommand's unknown option under the top-level usage, which lists none of the
    subcommand's options (a new user's `spqt generate -p hi --sparsty 0.5`): now under the subcommand's."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", "-p", "hi", "--sparsty", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: spqt generate "), err
    assert err.strip().splitlines()[-1] == "spqt generate: error: unrecognized arguments: --sparsty", err
    with pytest.raises(SystemExit) as e:  # before the subcommand: the top level's
        main(["--foo", "inspect", "x.spqt"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: spqt ") and not err.startswith("usage: spqt inspect"), err
    assert err.strip().splitlines()[-1] == "spqt: error: unrecognized arguments: --foo", err


def test_quantize_names_a_gguf_without_its_magic(capsys, tmp_path):
    """A .gguf that does not begin with GGUF's magic: quantize said "neither a GGUF file nor a Hugging Face
    checkpoint folder" where generate, perplexity and inspect say what is wrong with it."""
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    _error(capsys, ["quantize", str(fake), "-o", str(tmp_path / "q.spqt")], "not a GGUF file (it does not begin")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.gguf"]


def test_written_files_take_the_umask(tmp_path):
    """atomic_write's files get 0666 less the umask, as open() would make them (mkstemp's are 0600)."""
    import os

    from spqt.checkpoint import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: open(tmp, "w").write("{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_import_spqt_leaves_torch_unloaded():
    """`import spqt` and the CLI module import no torch (a Ctrl-C while the command starts is then caught by main's
    handler: one line, exit 130); spqt.quantize still works."""
    import subprocess
    import sys

    code = ("import sys, spqt, spqt.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "import numpy as np; b = spqt.quantize(np.ones((256, 256), np.float32), 'q4_k'); print(b.shape); "
            "assert spqt.layouts.matrix_to_blocks and spqt.errors.SpqtError")  # submodules load on first use
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_interrupt_while_starting_is_one_line(capsys, monkeypatch):
    from spqt import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["generate", "-p", "hi"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["spqt: interrupted"]


def test_ctrl_c_in_generate_ends_the_texts_line(tiny_spqt, capsys, monkeypatch):
    """Ctrl-C (SIGINT at the third decode step) while generate streams: exit 130, the text so far and a line end on
    stdout (`spqt: interrupted` went on after the text, on its line), one line on stderr after the model line."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import Generator
    from spqt.tokenizer import TextTokenizer

    loaded = load_spqt(tiny_spqt)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    tokens = Generator(loaded, "cpu", max_len=64).generate(tok.encode("once upon a time"), 3).tokens
    # the prefill's token and two steps' come out, less a character that their bytes leave unfinished
    shown = next(text for k in (3, 2, 1, 0) if not (text := tok.decode(tokens[:k])).endswith("\ufffd"))
    assert shown and not shown.endswith("\n") and not set(tokens) & set(tok.stop_ids)  # the test's premise
    ctrl_c_at_decode_step(monkeypatch, 3)
    capsys.readouterr()
    assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "20", "--device", "cpu"]) == 130
    out, err = capsys.readouterr()
    assert out == shown + "\n" and err.splitlines()[1:] == ["spqt: interrupted"], (out, err)


def test_auto_without_a_recommendation_decodes_dense(tiny_spqt, capsys):
    assert main(["generate", str(tiny_spqt), "-p", "hi", "-n", "2", "--sparsity", "auto", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "sparsity 0]" in err and "no recommended sparsity level" in err


def test_bad_criterion_is_one_line(tiny_spqt, capsys, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox. " * 50)
    for argv in (["calibrate", str(tiny_spqt), "--data", str(text), "--criterion", "magnitude"],
                 ["generate", str(tiny_spqt), "-p", "hi", "--sparsity", "0.5", "--criterion", "wine", "--device", "cpu"],
                 ["perplexity", str(tiny_spqt), "--data", str(text), "--criterion", "TEAL", "--device", "cpu"]):
        _error(capsys, argv, "unknown criterion")


def test_cuda_where_there_is_none(tiny_spqt, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error is for machines without one")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--device", "cuda"], "no CUDA GPU")
    _error(capsys, ["bench", "decode", "--model", "synthetic:llama2-7b"], "spqt bench needs a CUDA GPU")
    _error(capsys, ["bench", "decode", "--dtype", "fp8"], "unknown dtype 'fp8'")  # before the GPU is looked for
    _error(capsys, ["bench", "gemv", "--dtype", "bf16"], "--dtype is for spqt bench decode")
    _error(capsys, ["bench", "gemv", "--after-capture"], "--after-capture is for spqt bench decode")
    _error(capsys, ["tune", "--shapes", "64x64"], "spqt tune needs a CUDA GPU")
    # a bench's --json or --plot that cannot be written: said before any timing (here, before the GPU is looked for)
    _error(capsys, ["bench", "gemv", "--json", "/nonexistent-folder/b.json"], "does not exist")
    _error(capsys, ["bench", "gemv", "--plot", "/"], "it is a directory")
    _error(capsys, ["bench", "decode", "--plot", "p.png"], "--plot is for spqt bench gemv")
    _error(capsys, ["tune", "--model", str(tiny_spqt), "--output", str(tiny_spqt)], "is also the model")
    # a row's process that fails: its error line, once, with the row it was
    from argparse import Namespace

    from spqt.bench_decode import run_decode_benchmark
    from spqt.errors import SpqtError

    args = Namespace(model="synthetic:tiny", layouts="zigzag", types="q4_k", sparsity=[0.5], prompt_tokens=4,
                     new_tokens=4, one_process=False, dtype="bf16")  # (the child takes --dtype: else a usage error)
    for after_capture in (False, True):  # (the child takes --after-capture too)
        args.after_capture = after_capture
        with pytest.raises(SpqtError, match=r"^spqt bench decode \(q4_k, zigzag layout, sparsity 0.5\): spqt bench "
                                            r"needs a CUDA GPU; this machine has none$"):
            run_decode_benchmark(args, log=lambda line: None)


def test_bench_decode_child_runs_carry_the_row_and_the_options():
    """A row's child `spqt bench decode --one-process` run gets the row (model, type, layout, level) and the parent's
    options, --after-capture where it was asked and only then."""
    from argparse import Namespace

    from spqt.bench_decode import child_arguments
    from spqt.cli import build_parser

    args = Namespace(prompt_tokens=7, new_tokens=9, head="q8_0", dtype="fp16", after_capture=True)
    argv = child_arguments(args, "synthetic:tiny", "q6_k", "zigzag", 0.25, "/tmp/row.json")
    parsed = build_parser().parse_args(argv[2:])
    assert argv[:2] == ["-m", "spqt.cli"] and parsed.one_process and parsed.after_capture
    assert (parsed.model, parsed.types, parsed.layouts, parsed.sparsity) == ("synthetic:tiny", "q6_k", "zigzag", [0.25])
    assert (parsed.prompt_tokens, parsed.new_tokens, parsed.head, parsed.dtype, parsed.json) == (
        7, 9, "q8_0", "fp16", "/tmp/row.json")
    args.after_capture = False
    assert not build_parser().parse_args(child_arguments(args, "m.spqt", "q4_k", "row", 0.0, "o")[2:]).after_capture
    assert "--types" not in child_arguments(args, "m.spqt", "q4_k", "row", 0.0, "o")  # a file brings its own


def test_bench_decode_takes_a_model_file_of_any_type_on_the_gpu_kernels():
    """spqt bench decode of a model file: its rows carry the file's types (a mix's too) in its own layout, the other
    layout skipped; a float model or a non-Q4_K row model (dequantize + cuBLAS) refused with one line."""
    from spqt.bench_decode import file_rows_type
    from spqt.errors import SpqtError

    assert file_rows_type("q4_k-zigzag", "zigzag", "m") == "q4_k" and file_rows_type("q4_k-row", "row", "m") == "q4_k"
    assert file_rows_type("q6_k+q4_k-zigzag", "zigzag", "m") == "q6_k+q4_k"
    assert file_rows_type("q6_k+q4_k-zigzag", "row", "m") is None and file_rows_type("q4_k-row", "zigzag", "m") is None
    with pytest.raises(SpqtError, match="m is q6_k-row"):
        file_rows_type("q6_k-row", "row", "m")
    with pytest.raises(SpqtError, match="holds float weights"):
        file_rows_type("float", "zigzag", "m.gguf")


def test_bench_unknown_type_is_one_line(capsys):
    """Checked before the GPU is looked for, so it runs here."""
    for what in ("gemv", "decode"):
        _error(capsys, ["bench", what, "--types", "q4_k,q9_k", "--model", "synthetic:llama2-7b"], "unknown weight types ['q9_k']")


def test_calibrate_a_model_of_a_short_context(tmp_path, capsys):
    """A model whose context is under calibrate's 512-token windows (a tiny checkpoint of 256 positions) ended in a
    ValueError traceback ("max_len 512 exceeds the model's context 256"); its windows are now the whole context, as
    quantize --gptq's are."""
    from conftest import make_hf_checkpoint, save_quantized

    model = save_quantized(make_hf_checkpoint(tmp_path / "hf", n_layers=1, max_pos=256), tmp_path / "m.spqt")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    capsys.readouterr()
    assert main(["calibrate", str(model), "--data", str(text), "--tokens", "512", "--mode", "unified", "--sparsity",
                 "0.5", "--held-out-tokens", "256", "--device", "cpu"]) == 0
    assert "held-out calibration text (256 tokens)" in capsys.readouterr().out
    assert main(["perplexity", str(model), "--data", str(text), "--ctx", "256", "--sparsity", "0.5", "--chunks", "1",
                 "--device", "cpu"]) == 0


def test_perplexity_takes_llama_perplexity_tokens(tiny_spqt, tmp_path, monkeypatch):
    """As llama-perplexity reads and tokenizes -f: one trailing newline dropped; where the model adds BOS, BOS
    before the text's tokens (each chunk's first token then replaced by BOS: chunk 0 keeps the text's first token);
    a special token's text as plain text. The text was tokenized without BOS, so every chunk was one token later than
    llama.cpp's, and "</s>" in it was the end token."""
    import dataclasses

    import spqt.cli
    import spqt.evaluate
    from spqt.checkpoint import load_spqt
    from spqt.evaluate import PerplexityResult
    from spqt.tokenizer import TextTokenizer

    load = spqt.cli._load

    def adding_bos(args):
        loaded = load(args)
        return dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, add_bos=True))

    monkeypatch.setattr(spqt.cli, "_load", adding_bos)
    seen = {}

    def perplexities(gen, tokens, settings, **kwargs):
        seen.update(tokens=tokens, bos_id=kwargs["bos_id"])
        return [PerplexityResult(1.0, 0.0, 1, 1) for _ in settings]

    monkeypatch.setattr(spqt.evaluate, "perplexities", perplexities)
    text = tmp_path / "text.txt"
    text.write_text("once upon a time</s>\nthe quick brown fox\n\n", encoding="utf-8")
    assert main(["perplexity", str(tiny_spqt), "--data", str(text), "--device", "cpu"]) == 0
    loaded = load_spqt(tiny_spqt)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    bos, end = loaded.config.bos_id, tok.encode("</s>", add_bos=False)
    assert bos is not None and seen["bos_id"] == bos and len(end) == 1
    assert seen["tokens"][0] == bos and end[0] not in seen["tokens"]
    assert tok.decode(seen["tokens"][1:]) == "once upon a time</s>\nthe quick brown fox\n"


def test_calibrate_then_sparse_perplexity(tiny_spqt, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    model = tmp_path / "m.spqt"
    assert main(["calibrate", str(tiny_spqt), "--data", str(text), "--tokens", "1024", "--greedy-tokens", "512",
                 "--sparsity", "0.5", "--device", "cpu", "-o", str(model), "--held-out-tokens", "512", "--greedy-step", "0.05"]) == 0
    assert "recommended (highest level within +5 %)" in capsys.readouterr().out
    # a calibration replaces the criterion's thresholds: what it drops is said before it runs
    again = ["calibrate", str(model), "--data", str(text), "--tokens", "1024", "--device", "cpu", "--held-out-tokens",
             "0", "-o", str(tmp_path / "again.spqt"), "--mode", "unified"]
    # a level it cannot calibrate is one line before the load, not after the note on what it would drop
    import torch

    for levels, fragment in (("0", "got 0.0"), ("inf", "got inf"), ("0.25,1", "got 1.0")):
        _error(capsys, again + ["--sparsity", levels], f"calibration levels must be in (0, 1), {fragment}")
    _error(capsys, again[:-2] + ["--mode", "global", "--sparsity", "0.9"], "it cannot reach sparsity 0.9")
    short = tmp_path / "short.txt"  # so is a text too short for one window, and a device this machine lacks
    short.write_text("the quick brown fox.")
    _error(capsys, again[:3] + [str(short)] + again[4:] + ["--sparsity", "0.25"], "too few for one window of 512")
    _error(capsys, again[:3] + [str(short)] + again[4:8] + again[10:] + ["--sparsity", "0.25"],
           "too few for 8192 held-out tokens and one window of 512")
    if not torch.cuda.is_available():
        _error(capsys, again + ["--sparsity", "0.25", "--device", "cuda"], "no CUDA GPU")
    for few in ("-1", "3"):  # 1 to 3 failed after the calibration with "--ctx must be between 4 and ...", no such flag
        _error(capsys, again + ["--sparsity", "0.25", "--held-out-tokens", few],
               f"--held-out-tokens must be 0 (no held-out check) or at least 4, got {few}")
    assert main(again + ["--sparsity", "0.25"]) == 0
    note = "spqt: note: this replaces the model's teal thresholds, dropping greedy 0.5; unified 0.5; pass every level"
    assert note in capsys.readouterr().err
    assert main(again[:-2] + ["--mode", "both", "--sparsity", "0.25,0.5", "--greedy-tokens", "512",
                              "--greedy-step", "0.05"]) == 0
    assert "spqt: note" not in capsys.readouterr().err  # it keeps every level and mode
    assert main(["generate", str(model), "-p", "once upon", "-n", "4", "--sparsity", "auto", "--device", "cpu"]) == 0
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("once upon a time there was a king. hello world, sparse decoding. " * 200)
    report = tmp_path / "ppl.json"
    capsys.readouterr()
    assert main(["perplexity", str(model), "--data", str(evaluation), "--ctx", "128", "--sparsity", "0,0.5",
                 "--device", "cpu", "--json", str(report), "--chunks", "1000"]) == 0
    dense = json.loads(report.read_text())["results"][0]  # the text's whole chunks, fewer than asked
    chunks, scored = dense["chunks"], dense["scored_tokens"]
    assert 1 < chunks < 1000 and scored > chunks * 32
    assert f"{chunks} chunks of 128 tokens, {scored} tokens scored (--chunks 1000: the text has only {chunks})" \
        in capsys.readouterr().out
    rows = json.loads(report.read_text())["results"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.5]
    assert rows[1]["achieved"]["all"] > 0.3 and rows[0]["ppl"] > 1
    _error(capsys, ["perplexity", str(model), "--data", str(tmp_path / "none.txt")], "no such file")
    _error(capsys, ["perplexity", str(model), "--data", str(evaluation), "--ctx", "100000", "--device", "cpu"], "--ctx")


def test_tune_refuses_a_table_it_cannot_write_before_timing(tmp_path, monkeypatch, capsys):
    """spqt tune (GPU faked, timing refused): a table it cannot write (--output under a file or a folder itself, or
    this GPU's user table in a folder that is not one) is one error line before any timing, not a traceback after
    minutes of it; a missing folder is made (as before); without --output it writes the user table, its folders made;
    nothing is left behind."""
    import torch

    import spqt.bench
    from spqt.kernels import tuning

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test-gpu")
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    monkeypatch.setattr(tuning, "sm_count", lambda: 132)  # (no device properties here)

    def no_timing(*args, **kwargs):
        raise AssertionError("timed before the table was found writable")

    monkeypatch.setattr(spqt.bench, "tune", no_timing)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _error(capsys, ["tune", "--shapes", "64x64", "--output", str(blocker / "t.json")], f"cannot write {blocker}")
    _error(capsys, ["tune", "--shapes", "64x64", "--output", str(tmp_path)], "it is a directory")
    monkeypatch.setenv("SPQT_TUNED", str(blocker / "tuned"))
    _error(capsys, ["tune", "--shapes", "64x64"],
           f"cannot write {blocker / 'tuned' / 'test-gpu.json'}: {blocker} is not a folder (this GPU's user table: set "
           "SPQT_TUNED to a writable folder, or pass --output TABLE.json)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # writable: the tune runs (faked), its missing folder made
    tuning._load_table.cache_clear()
    monkeypatch.setattr(spqt.bench, "tune", lambda shapes, variants: {})
    out = tmp_path / "new" / "t.json"
    assert main(["tune", "--shapes", "64x64", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["kernel_version"] == tuning.KERNEL_VERSION
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.json"]
    # without --output: the user table, where it says it wrote
    monkeypatch.setenv("SPQT_TUNED", str(tmp_path / "user" / "tuned"))
    capsys.readouterr()
    assert main(["tune", "--shapes", "64x64"]) == 0
    user = tmp_path / "user" / "tuned" / "test-gpu.json"
    assert capsys.readouterr().out.splitlines() == [f"wrote {user}"]
    assert json.loads(user.read_text())["kernel_version"] == tuning.KERNEL_VERSION
    tuning._load_table.cache_clear()


def test_tune_routes_bad_input(capsys):
    """spqt tune --routes without models, or with levels outside (0, 1): one error line, before any GPU work."""
    _error(capsys, ["tune", "--routes", ""], "--routes needs models")
    _error(capsys, ["tune", "--routes", "synthetic:tiny", "--route-levels", "0.5,1.5"], "--route-levels in (0, 1)")
    for mode in (["--cuda-against-table"], ["--pairs", "synthetic:llama2-7b"], ["--l2first", "synthetic:llama2-7b"]):
        _error(capsys, ["tune", *mode, "--types", "q2_k"], "--types picks the types of a kernel tune")


def test_tune_shapes_name_the_maps_the_runtime_runs():
    """spqt tune's model names give the maps as the runtime stores them (q|k|v and gate|up fused: the forty-ninth
    session's `--shapes llama3-8b` tuned the matrices one by one, and the 8B's fused maps kept Q4_K's configs) besides
    bench gemv's matrices; bench gemv's names stay its matrices; `default` names the default model's maps; the default
    covers the same shapes as before."""
    from spqt.bench import MODEL_SHAPES, parse_shapes, runtime_shapes
    from spqt.cli import TUNE_SHAPES
    from spqt.errors import SpqtError

    tuned = parse_shapes("llama3-8b", runtime_maps=True)
    assert tuned[:3] == MODEL_SHAPES["llama3-8b"]
    assert tuned[3:] == [(6144, 4096), (4096, 4096), (28672, 4096)]  # down (4096x14336) is one of the three
    assert parse_shapes("llama3-8b") == MODEL_SHAPES["llama3-8b"]
    # the default model's maps (SmolLM2-135M: q|k|v, o, gate|up, down), those runtime ends with
    assert parse_shapes("default") == [(960, 576), (576, 576), (3072, 576), (576, 1536)] == runtime_shapes()[-4:]
    assert parse_shapes("qwen2.5-7b", runtime_maps=True) == [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]
    with pytest.raises(SpqtError, match="unknown shape 'qwen2.5-7b'"):
        parse_shapes("qwen2.5-7b")
    for bad in ("12x", "mixtral", "4096x4096x2", "0x64"):
        with pytest.raises(SpqtError, match=f"unknown shape '{bad}'"):
            parse_shapes(bad, runtime_maps=True)
    default = parse_shapes(TUNE_SHAPES, runtime_maps=True)
    assert len(default) == len(set(default))
    assert set(default) == {s for name in MODEL_SHAPES for s in MODEL_SHAPES[name]} | set(runtime_shapes())
    # what spqt tune itself times
    from spqt import cli

    assert cli._tune_shapes(cli.build_parser().parse_args(["tune", "--shapes", "llama3-8b"])) == tuned
    assert cli._tune_shapes(cli.build_parser().parse_args(["tune"])) == default


def test_bench_decode_compares_each_level_with_dense():
    """spqt bench decode's rows: each sparse row's speed over its model's, type's and layout's dense row, and a line
    naming the levels slower than dense beyond the runs' margin (none where a model has no dense row)."""
    from spqt.bench_decode import compare_with_dense

    def row(model, s, rate, layout="zigzag"):
        return {"model": model, "type": "q4_k", "layout": layout, "sparsity": s, "tokens_per_s": rate}

    rows = [row("a", 0.0, 100.0), row("a", 0.25, 99.6), row("a", 0.4, 97.0), row("a", 0.5, 150.0),
            row("a", 0.0, 50.0, "row"), row("b", 0.5, 80.0)]
    lines = compare_with_dense(rows)
    assert lines == ["a q4_k zigzag: over dense 0.25 1.00x, 0.4 0.97x, 0.5 1.50x; slower than dense by over 1 %: 0.4"]
    assert [r.get("over_dense") for r in rows] == [None, 0.996, 0.97, 1.5, None, None]
    assert compare_with_dense([row("a", 0.0, 100.0), row("a", 0.5, 120.0)])[0].endswith("by over 1 %: none")


def test_bench_decode_rows_record_the_route_switches(monkeypatch):
    """A decode row records the SPQT_* variables that change what a step runs (not the cache, commit or API key, nor
    the tuned tables' folder: a row names the table it ran on under "table")."""
    import os

    from spqt.bench_decode import route_switches

    for name in [k for k in os.environ if k.startswith("SPQT_")]:
        monkeypatch.delenv(name)
    assert route_switches() == {}
    for name, value in (("SPQT_SPARSE_KEPT", "norm"), ("SPQT_CHAIN", "1"), ("SPQT_CACHE", "/tmp/c"),
                        ("SPQT_COMMIT", "abc"), ("SPQT_API_KEY", "k"), ("OTHER_SPQT_X", "1"), ("SPQT_TUNED", "/t")):
        monkeypatch.setenv(name, value)
    assert route_switches() == {"SPQT_CHAIN": "1", "SPQT_SPARSE_KEPT": "norm"}


def test_probe_report_and_options(capsys, monkeypatch):
    """The decode probes' shared pieces: print_step_comparison prints every round and each later setup's saving
    against the first (median of its rounds), and returns the medians; probe_arguments' span options default to one
    key block and reach probe_generator_from's call."""
    import argparse

    from spqt import bench_decode

    medians = bench_decode.print_step_comparison("m dense", {"A": [100.0, 104.0, 90.0], "B": [95.0, 97.0, 99.0]})
    assert medians == {"A": 100.0, "B": 97.0}
    assert capsys.readouterr().out == ("m dense, step device time (us): A 100.0, 104.0, 90.0; B 95.0, 97.0, 99.0\n"
                                       "  B: 3.0 us less than A (3.0 %)\n")
    ap = argparse.ArgumentParser()
    bench_decode.probe_arguments(ap, "synthetic:tiny")
    args = ap.parse_args(["--prompt-tokens", "300", "--max-len", "600"])
    assert (args.model, args.prompt_tokens, args.max_len) == ("synthetic:tiny", 300, 600)
    assert ap.parse_args([]).max_len == 64 and ap.parse_args([]).prompt_tokens == 10
    calls = []
    monkeypatch.setattr(bench_decode, "probe_generator", lambda *a: calls.append(a))
    bench_decode.probe_generator_from(args, 0.5)
    assert calls == [("synthetic:tiny", 0.5, 300, 600)]


def test_probe_attribute_setups_restore_the_shipped_value(monkeypatch):
    """alternating_attribute_us (switch_probe, constant_probe, attention_programs_probe): each setup sets the
    attribute to its value before its capture, and the shipped value is back afterwards, also when a capture fails."""
    from types import SimpleNamespace

    from spqt import bench_decode

    owner = SimpleNamespace(KNOB=7)
    seen = []

    def fake(gen, prompt, setups, rounds, reps):
        for name, apply in setups.items():
            apply()
            seen.append((name, owner.KNOB))
        return {name: [1.0] for name in setups}

    monkeypatch.setattr(bench_decode, "alternating_step_us", fake)
    out = bench_decode.alternating_attribute_us(None, [1], owner, "KNOB", {"a": 1, "b": 2}, 2, 3)
    assert seen == [("a", 1), ("b", 2)] and out == {"a": [1.0], "b": [1.0]} and owner.KNOB == 7

    def failing(gen, prompt, setups, rounds, reps):
        setups["a"]()
        raise RuntimeError("capture failed")

    monkeypatch.setattr(bench_decode, "alternating_step_us", failing)
    with pytest.raises(RuntimeError):
        bench_decode.alternating_attribute_us(None, [1], owner, "KNOB", {"a": 1}, 2, 3)
    assert owner.KNOB == 7


def test_invalid_thresholds_file_is_named(tiny_spqt, capsys, tmp_path):
    """A --thresholds file of the right keys but wrong shapes: the one error line names that file, not the model."""
    table = tmp_path / "bad-table.json"
    table.write_text(json.dumps({"thresholds": {"unified": {"0.5": [[0.1, 0.1]]}}}))
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "-n", "2", "--device", "cpu", "--sparsity", "0.5",
                    "--thresholds", str(table)], f"{table}: invalid thresholds")


def test_quantize_with_gptq_and_its_errors(tiny_hf, capsys, tmp_path):
    """--gptq: the calibration text read before the load (a bad path or bytes fail at once), too little text one
    line, --gptq-tokens below a window a usage error; a run records its calibration in the provenance."""
    out = tmp_path / "g.spqt"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox.")
    text = tmp_path / "text.txt"
    text.write_text("once upon a time there was a king. the quick brown fox jumps over the lazy dog. " * 40)
    base = ["quantize", str(tiny_hf), "-o", str(out), "--device", "cpu"]
    _error(capsys, base + ["--gptq", str(tmp_path / "none.txt")], "no such file")
    _error(capsys, base + ["--gptq", str(binary)], "not UTF-8 text")
    _error(capsys, base + ["--gptq", str(short)], "fewer than one window of 512")
    _usage_error(capsys, base + ["--gptq", str(text), "--gptq-tokens", "100"], "--gptq-tokens: must be at least 512")
    _error(capsys, base + ["--gptq-tokens", "1024"], "pass the calibration text too")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "short.txt", "text.txt"]
    assert main(base + ["--type", "q5_k", "--gptq", str(text), "--gptq-tokens", "1024"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    provenance = json.loads(capsys.readouterr().out.split("provenance   ", 1)[1])
    assert provenance["gptq"]["tokens"] == 1024 and provenance["gptq"]["maps"] == 8



def test_readme_command_line_lists_every_option():
    """Each subcommand's options appear in its lines of the README's command-line synopsis (a user reads them
    first; generate's --thresholds, calibrate's -o and --tokens, perplexity's --mode and --batch, serve's --name
    were missing)."""
    import argparse
    import re
    from pathlib import Path

    from spqt.cli import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    synopsis = readme.split("## Command line", 1)[1].split("`SRC`", 1)[0]
    entries = re.split(r"\n    (?=spqt )", synopsis)  # an entry: a command's first line and its continuation lines
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        text = "\n".join(e for e in entries if e.startswith(f"spqt {name} "))
        for action in parser._actions:
            shown = [o for o in action.option_strings if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
            if action.option_strings and "--help" not in action.option_strings and not shown:
                missing.append(f"spqt {name} {action.option_strings[-1]}")
    assert not missing, missing


def test_synthetic_decode_models_are_valid_configs():
    """Every synthetic model of `spqt bench decode` is a configuration the runtime accepts, with the switches its name
    promises (the families' paths it is there to time): Gemma's windows and norms, Qwen3's q / k norms, Phi-3's head dim
    of 96 and window in every layer, Gemma 2's soft-caps on alternate sliding layers, Qwen2.5's q|k|v bias, OLMo 2's
    norms (post-norms alone, q / k normed whole) on Llama 2 7B's map shapes (its tuned routes), and Olmo 3's too, with
    three layers of four sliding over 4,096 keys on a plain table of their own, the fourth YaRN-scaled (factor 8);
    GLM-4 9B's four norms, q|k|v bias and half-rotated heads; EXAONE 4.0 32B's post-norms alone with per-head q / k
    norms, three layers of four sliding over 4,096 keys, the fourth unrotated, llama3 scaling; ERNIE 4.5 0.3B's heads
    of 128 on a dim of 1,024, whole heads rotated, no biases; Seed-OSS 36B's 80 heads of 128 on a dim of 5,120, q|k|v
    bias, an untied head."""
    from spqt.bench_decode import SYNTHETIC
    from spqt.config import ModelConfig

    configs = {name: ModelConfig(**geometry, max_seq_len=8192) for name, geometry in SYNTHETIC.items()}
    assert configs["gemma3-1b"].qk_norm and configs["gemma3-1b"].window(0) == 512 and not configs["gemma3-1b"].window(5)
    assert configs["qwen3-8b"].qk_norm and configs["qwen3-8b"].head_dim == 128
    assert configs["phi3-mini"].head_dim == 96 and all(configs["phi3-mini"].window(i) == 2047 for i in range(32))
    gemma2 = configs["gemma2-2b"]
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0) and not gemma2.qk_norm
    assert [gemma2.window(i) for i in range(4)] == [4096, 0, 4096, 0]
    assert configs["qwen2.5-7b"].linear_biases == ("qkv",)
    olmo2 = configs["olmo2-7b"]
    assert olmo2.layer_norms() == {"q_norm": 4096, "k_norm": 4096, "post_attention_norm": 4096, "post_ffn_norm": 4096}
    assert olmo2.map_shapes() == configs["llama2-7b"].map_shapes()
    glm4 = configs["glm4-9b"]
    assert glm4.layer_norms() == dict.fromkeys(("attention_norm", "ffn_norm", "post_attention_norm", "post_ffn_norm"),
                                               4096)
    assert glm4.linear_biases == ("qkv",) and glm4.rotary_dims == 64 and glm4.map_shapes()[0] == (4096 + 2 * 256, 4096)
    olmo3 = configs["olmo3-7b"]
    assert olmo3.layer_norms() == olmo2.layer_norms() and olmo3.map_shapes() == olmo2.map_shapes()
    assert [olmo3.window(i) for i in range(8)] == [4096, 4096, 4096, 0] * 2
    assert [olmo3.rotates_locally(i) for i in range(4)] == [True, True, True, False]
    assert olmo3.rope_attention_factor == pytest.approx(1.2079441541679836) and max(olmo3.rope_freq_factors) == 8.0
    exaone4 = configs["exaone4-32b"]
    assert exaone4.layer_norms() == {"q_norm": 128, "k_norm": 128, "post_attention_norm": 5120, "post_ffn_norm": 5120}
    assert [(exaone4.window(i), exaone4.rotates(i)) for i in range(8)] == [(4096, True)] * 3 + [(0, False)] + [
        (4096, True)] * 3 + [(0, False)]
    assert exaone4.map_shapes()[0] == (5120 + 2 * 1024, 5120) and exaone4.rope_scaling["factor"] == 16.0
    ernie = configs["ernie4.5-0.3b"]
    assert ernie.map_shapes() == [(2048 + 2 * 256, 1024), (1024, 2048), (2 * 3072, 1024), (1024, 3072)]
    assert (ernie.rotary_dims, ernie.linear_biases, ernie.layer_norms()) == (
        128, (), {"attention_norm": 1024, "ffn_norm": 1024})
    seed_oss = configs["seed-oss-36b"]
    assert seed_oss.map_shapes() == [(10240 + 2 * 1024, 5120), (5120, 10240), (2 * 27648, 5120), (5120, 27648)]
    assert (seed_oss.rotary_dims, seed_oss.linear_biases, seed_oss.layer_norms(), seed_oss.tie_embeddings) == (
        128, ("qkv",), {"attention_norm": 5120, "ffn_norm": 5120}, False)
