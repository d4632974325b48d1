"""The runtime commands: generate, perplexity, calibrate through the CLI, and their errors
(one line on stderr, exit code 2)."""

import json

import pytest

from spqt.cli import main


def _error(capsys, argv, fragment):
    capsys.readouterr()  # drop what earlier calls printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error:") and fragment in err[0], err


def test_generate_streams_and_reports(tiny_spqt, capsys):
    assert main(["generate", str(tiny_spqt), "-p", "once upon a time", "-n", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("once upon a time")
    assert "decode:" in out and "tokens/s" in out


def test_generate_errors(tiny_spqt, capsys, tmp_path):
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hello " * 3000, "-n", "8", "--device", "cpu"], "exceed the model's context")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--device", "tpu"], "unknown device")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--sparsity", "1.5", "--device", "cpu"], "sparsity must be in")
    _error(capsys, ["generate", str(tiny_spqt), "-p", "hi", "--sparsity", "0.5", "--device", "cpu"], "no teal unified thresholds")
    _error(capsys, ["generate", str(tmp_path / "nope.spqt"), "-p", "hi"], "no such file")


def test_auto_without_a_recommendation_decodes_dense(tiny_spqt, capsys):
    assert main(["generate", str(tiny_spqt), "-p", "hi", "-n", "2", "--sparsity", "auto", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "sparsity 0]" in out and "no recommended sparsity level" in err


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


def test_calibrate_then_sparse_perplexity(tiny_spqt, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    model = tmp_path / "m.spqt"
    assert main(["calibrate", str(tiny_spqt), "--data", str(text), "--tokens", "1024", "--greedy-tokens", "512",
                 "--sparsity", "0.5", "--device", "cpu", "-o", str(model), "--held-out-tokens", "512", "--greedy-step", "0.05"]) == 0
    assert "recommended (highest level within +5 %)" in capsys.readouterr().out
    assert main(["generate", str(model), "-p", "once upon", "-n", "4", "--sparsity", "auto", "--device", "cpu"]) == 0
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("once upon a time there was a king. hello world, sparse decoding. " * 200)
    report = tmp_path / "ppl.json"
    assert main(["perplexity", str(model), "--data", str(evaluation), "--ctx", "128", "--sparsity", "0,0.5",
                 "--device", "cpu", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]
    assert [r["sparsity"] for r in rows] == [0.0, 0.5]
    assert rows[1]["achieved"]["all"] > 0.3 and rows[0]["ppl"] > 1
    _error(capsys, ["perplexity", str(model), "--data", str(tmp_path / "none.txt")], "no such file")
    _error(capsys, ["perplexity", str(model), "--data", str(evaluation), "--ctx", "100000", "--device", "cpu"], "--ctx")
