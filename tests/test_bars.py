"""scripts/bars.py: issues 14 and 15's bars judged from bench JSON (the verdicts at and beside each threshold)."""

import json

import pytest

from conftest import script_module


@pytest.fixture(scope="module")
def bars():
    return script_module("bars")


def _write(tmp_path, name, benchmark, rows):
    path = tmp_path / name
    path.write_text(json.dumps({"benchmark": benchmark, "device": "NVIDIA H200", "commit": "abc1234", "rows": rows}))
    return path


def _decode(model, sparsity, tok_s, floor=0.5):
    return {"model": f"synthetic:{model}", "type": "q4_k", "layout": "zigzag", "sparsity": sparsity,
            "tokens_per_s": tok_s, "frac_of_floor": floor}


def _gemv(shape, typ, variant, sparsity, frac=0.8, x=1.0, mb=132.0):
    return {"shape": shape, "type": typ, "variant": variant, "sparsity": sparsity, "active": 1 - sparsity,
            "bytes": mb * 1e6 * (1 - sparsity), "frac_copy_bw": frac, "speedup_vs_B2": x}


def test_decode_bars(bars, tmp_path):
    path = _write(tmp_path, "d.json", "decode", [
        _decode("llama2-7b", 0.0, 600.0), _decode("llama2-7b", 0.5, 899.0), _decode("llama2-7b", 0.25, 597.0),
        _decode("llama2-70b", 0.0, 60.0, floor=0.7499), _decode("llama2-13b", 0.0, 300.0),
        _decode("llama2-13b", 0.4, 298.6)])
    got = {(bar, figure): status for bar, figure, status, _ in bars.judge([path])}
    assert got[("7B dense >= 600 tok/s", "600.0 tok/s")] == "met"
    assert got[("7B at 50 % >= 900 tok/s", "899.0 tok/s")] == "missed"
    assert got[("7B at 50 % >= 1.5x its dense", "1.498x (899.0 / 600.0)")] == "missed"
    assert got[("70B dense >= 75 % of the floor", "75.0 %")] == "missed"  # 74.99 %, printed rounded
    spread = "not slower than dense (0.5 % spread)"
    assert got[(f"llama2-7b at 25 % {spread}", "597.0 against 600.0 tok/s")] == "met"  # within 0.5 %
    assert got[(f"llama2-13b at 40 % {spread}", "298.6 against 300.0 tok/s")] == "met"
    slower = bars.judge([_write(tmp_path, "s.json", "decode", [_decode("llama2-7b", 0.0, 600.0),
                                                                 _decode("llama2-7b", 0.4, 596.9)])])
    assert [r[2] for r in slower if "not slower" in r[0]] == ["missed"]
    fast = bars.judge([_write(tmp_path, "f.json", "decode", [_decode("llama2-7b", 0.0, 600.0),
                                                               _decode("llama2-7b", 0.5, 900.0)])])
    assert [r[2] for r in fast if r[0].startswith("7B at 50")] == ["met", "met"]
    # each of the two bars on its own: fast enough but under 1.5x its dense; and no dense row in the file
    ratio = bars.judge([_write(tmp_path, "r.json", "decode", [_decode("llama2-7b", 0.0, 700.0),
                                                                _decode("llama2-7b", 0.5, 1000.0)])])
    assert [(r[0], r[2]) for r in ratio if r[0].startswith("7B at 50")] == [
        ("7B at 50 % >= 900 tok/s", "met"), ("7B at 50 % >= 1.5x its dense", "missed")]
    alone = bars.judge([_write(tmp_path, "a.json", "decode", [_decode("llama2-7b", 0.5, 950.0)])])
    assert [(r[0], r[2]) for r in alone] == [("7B at 50 % >= 900 tok/s", "met")]


def test_gemv_bars(bars, tmp_path):
    path = _write(tmp_path, "g.json", "gemv", [
        _gemv("28672x8192", "q4_k", "B2", 0.0, frac=0.85), _gemv("28672x8192", "q4_k", "B4", 0.5, x=1.79),
        _gemv("4096x4096", "q4_k", "B4", 0.25, x=1.1, mb=9.4), _gemv("4096x4096", "q4_k", "B2", 0.0, frac=0.3, mb=9.4),
        _gemv("8192x28672", "q5_k", "B2", 0.0, frac=0.7499), _gemv("8192x28672", "q5_k", "B4", 0.5, x=1.6, mb=162),
        _gemv("4096x4096", "q2_k", "B4", 0.5, x=1.0, mb=5.5), _gemv("4096x4096", "q8_0", "B4", 0.25, x=1.0, mb=17.8),
        _gemv("8192x28672", "q4_k", "B4", 0.5, x=float("nan"))])
    got = {bar: status for bar, _, status, _ in bars.judge([path])}
    assert got == {
        "q4_k B2 >= 85 % of copy, 28672x8192": "met",
        "q4_k B4 / B2 at 50 % >= 1.8x, 28672x8192 (>= 25 MB)": "missed",
        "q4_k B4 / B2 at 25 % >= 1.1x, 4096x4096 (< 25 MB)": "met",
        "q5_k B2 >= 75 % of copy, 8192x28672": "missed",
        "q5_k B4 / B2 at 50 % >= 1.6x, 8192x28672 (162 MB)": "met",
    }  # the 4096x4096 B2 row has no bar; Q2_K's 5.5 MB and Q8_0's 25 % rows neither; a B4 without its B2 (NaN) none


def test_main_prints_a_table_and_usage(bars, tmp_path, capsys):
    assert bars.main([]) == 2
    path = _write(tmp_path, "d.json", "decode", [_decode("llama2-7b", 0.0, 541.3)])
    assert bars.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 7B dense >= 600 tok/s | 541.3 tok/s | missed | d.json (NVIDIA H200, abc1234) |" in out
    assert "1 figures, 1 missed" in out
    absent = out.strip().splitlines()[-1]
    assert absent.startswith(f"no figure in these files for {len(bars.expected_bars()) - 1} bars: 7B at 50 % >= 900")
    assert "q2_k B2 >= 75 % of copy, 8192x28672" in absent and "7B dense" not in absent
