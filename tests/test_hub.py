"""spqt.hub: Hugging Face Hub names (parsing, which file a tag picks, a checkpoint's files), and the CLI running hub
models through huggingface_hub itself against a stand-in of the Hub's HTTP API on 127.0.0.1 (no network in the tests):
downloads, the offline cache, split GGUFs, the errors."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from spqt import hub
from spqt.errors import SpqtError

ROOT = Path(__file__).resolve().parents[1]

BARTOWSKI = ["README.md", "Qwen2.5-0.5B-Instruct-IQ4_XS.gguf", "Qwen2.5-0.5B-Instruct-Q4_K_L.gguf",
             "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "Qwen2.5-0.5B-Instruct-Q4_K_S.gguf", "Qwen2.5-0.5B-Instruct-Q8_0.gguf",
             "Qwen2.5-0.5B-Instruct-f16.gguf", "Qwen2.5-0.5B-Instruct-Q4_K.gguf"]


def test_names_parse():
    assert hub.parse("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF") == ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", None)
    assert hub.parse("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M") == (
        "bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M")
    assert hub.parse("https://huggingface.co/org/m.v1:model.gguf") == ("org/m.v1", "model.gguf")
    assert hub.is_hub_name("hf:a/b") and not hub.is_hub_name("models/a.gguf") and not hub.is_hub_name(None)
    assert hub.served_name("hf:o/tiny-model", ROOT) == "tiny-model"  # a checkpoint folder: the repo's name
    assert hub.served_name("hf:o/r:Q8_0", Path(__file__)) == "test_hub"  # a file: its stem
    for bad in ("hf:only-a-name", "hf:a/b/c", "hf:a/b:", "hf.co/", "hf:a b/c"):
        with pytest.raises(SpqtError, match="hf:ORG/REPO"):
            hub.parse(bad)


def test_a_tag_picks_its_file_whole():
    name = "hf:bartowski/Qwen2.5-0.5B-Instruct-GGUF"
    assert hub.choose(name, BARTOWSKI, "Q4_K_M") == ["Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"]
    assert hub.choose(name, BARTOWSKI, "q8_0") == ["Qwen2.5-0.5B-Instruct-Q8_0.gguf"]  # any case
    assert hub.choose(name, BARTOWSKI, "Q4_K") == ["Qwen2.5-0.5B-Instruct-Q4_K.gguf"]  # not Q4_K_M, Q4_K_S, Q4_K_L
    assert hub.choose(name, BARTOWSKI, "Qwen2.5-0.5B-Instruct-f16.gguf") == ["Qwen2.5-0.5B-Instruct-f16.gguf"]
    assert hub.choose(name, BARTOWSKI, None) == ["Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"]  # llama.cpp's default
    assert hub.choose(name, ["a-Q6_K.gguf", "a-Q8_0.gguf"], None) == ["a-Q8_0.gguf"]  # its next
    assert hub.choose(name, ["a-Q6_K.gguf", "a-Q5_K.gguf"], None) == ["a-Q5_K.gguf"]  # then the first
    assert hub.choose(name, ["README.md", "sub/m-Q2_K.gguf"], None) == ["sub/m-Q2_K.gguf"]  # the only one
    assert hub.choose(name, ["a.spqt", "config.json"], None) == ["a.spqt"]
    assert hub.choose(name, ["config.json", "model.safetensors"], None) is None  # a checkpoint
    # the projectors, importance matrices and draft heads llama.cpp's -hf skips are no model
    assert hub.choose(name, ["config.json", "model.safetensors", "mmproj-model-f16.gguf", "imatrix.gguf"],
                      None) is None
    assert hub.choose(name, ["m-Q8_0.gguf", "mmproj-m-f16.gguf"], None) == ["m-Q8_0.gguf"]
    with pytest.raises(SpqtError, match="Q3_K_M names none of its model files .*Q8_0.gguf"):
        hub.choose(name, BARTOWSKI, "Q3_K_M")
    with pytest.raises(SpqtError, match="XS names none"):  # (IQ4_XS's part is IQ4_XS, not XS)
        hub.choose(name, BARTOWSKI, "XS")
    with pytest.raises(SpqtError, match="no .gguf or .spqt model files, so no Q4_K_M"):
        hub.choose(name, ["config.json"], "Q4_K_M")
    split = ["Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "m-Q8_0.gguf"]
    assert hub.choose(name, split, "Q4_K_M") == sorted(split[:2])  # every part, the first first
    assert hub.choose(name, split, "m-Q4_K_M-00002-of-00002.gguf") == sorted(split[:2])  # a part names its model
    assert hub.choose(name, split + ["m-Q4_K_M.gguf"], "Q4_K_M") == ["m-Q4_K_M.gguf"]  # a whole file first
    with pytest.raises(SpqtError, match="holds 1 of the 3 parts"):
        hub.choose(name, ["m-00001-of-00003.gguf"], None)
    assert hub.checkpoint_files(["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                 "tokenizer.json", "tokenizer.model", "chat_template.jinja", "README.md",
                                 "consolidated.safetensors", "sub/extra.safetensors", "original/params.json",
                                 "pytorch_model.bin"]) == [
        "config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer.model", "chat_template.jinja"]
    assert hub.checkpoint_files(["config.json", "pytorch_model-00001-of-00002.bin", "vocab.txt"]) == [
        "config.json", "vocab.txt", "pytorch_model-00001-of-00002.bin"]


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's HTTP API as far as huggingface_hub's list_repo_files, hf_hub_download and snapshot_download use it:
    REPOS {repo: {path: bytes}}, one commit; a repo in GATED answers its files 403 as a gated repo does."""

    REPOS: dict[str, dict[str, bytes]] = {}
    GATED: set[str] = set()
    COMMIT = "c" * 40

    def log_message(self, *args):
        pass

    def answer(self, code: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, code: int, kind: str, message: str):
        self.answer(code, json.dumps({"error": message}).encode(),
                    {"X-Error-Code": kind, "X-Error-Message": message, "Content-Type": "application/json"})

    def do_GET(self):
        parts = unquote(urlparse(self.path).path).strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[:2])
        if repo not in self.REPOS:
            return self.error(404, "RepoNotFound", "Repository not found")
        files = self.REPOS[repo]
        if api and parts[4] == "tree":
            items = [{"type": "file", "oid": hashlib.sha1(b).hexdigest(), "size": len(b), "path": f}
                     for f, b in files.items()]
            return self.answer(200, json.dumps(items).encode(), {"Content-Type": "application/json"})
        if api and parts[4] == "revision":
            info = {"id": repo, "sha": self.COMMIT, "siblings": [{"rfilename": f} for f in files]}
            return self.answer(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if len(parts) > 4 and parts[2] == "resolve":
            if repo in self.GATED:
                return self.error(403, "GatedRepo", f"Access to model {repo} is restricted.")
            body = files.get("/".join(parts[4:]))
            if body is None:
                return self.error(404, "EntryNotFound", "Entry not found")
            return self.answer(200, body, {"X-Repo-Commit": self.COMMIT, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
        self.answer(404)

    do_HEAD = do_GET


@pytest.fixture
def fake_hub(tiny_hf, tmp_path):
    """A FakeHub on a free port holding the tiny checkpoint (o/tiny: its top-level files, a subfolder and Mistral's
    consolidated copy besides), a repo of split GGUF parts (o/split) and a gated one; the environment that points
    spqt's subprocesses at it, with a cache of their own."""
    tiny = {f.name: f.read_bytes() for f in tiny_hf.iterdir() if f.is_file()}
    FakeHub.REPOS = {"o/tiny": {**tiny, "README.md": b"# tiny", "consolidated.safetensors": b"x" * 64,
                                "sub/extra.safetensors": b"y" * 64},
                     "o/split": {"m-Q4_K_M-00001-of-00002.gguf": b"GGUF1", "m-Q4_K_M-00002-of-00002.gguf": b"GGUF2",
                                 "mmproj-m-f16.gguf": b"GGUF3"},
                     "o/gated": {"m-Q8_0.gguf": b"GGUF"}}
    FakeHub.GATED = {"o/gated"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_TOKEN", None)
    yield env, tmp_path
    server.shutdown()


def spqt(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spqt.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_cli_runs_hub_models_through_huggingface_hub(fake_hub, tiny_hf):
    """Through huggingface_hub itself against a stand-in of the Hub's API: a checkpoint's top-level files alone are
    fetched and it generates as its folder does; offline (HF_HUB_OFFLINE=1) the cached snapshot runs the same;
    a split GGUF comes with every part, its projector left; a gated repo, a missing one and an offline miss are one
    line each, exit 2."""
    env, home = fake_hub
    args = ["-p", "the quick", "-n", "5", "--device", "cpu", "--gemv", "fp32"]
    want = spqt(env, "generate", str(tiny_hf), *args)
    assert want.returncode == 0, want.stderr
    got = spqt(env, "generate", "hf:o/tiny", *args)
    assert got.returncode == 0 and got.stdout == want.stdout, got.stderr
    snapshot = home / "hub" / "models--o--tiny" / "snapshots" / FakeHub.COMMIT
    fetched = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert fetched == sorted(f.name for f in tiny_hf.iterdir() if f.is_file())  # no README, subfolder, copy
    offline = spqt({**env, "HF_HUB_OFFLINE": "1"}, "generate", "hf:o/tiny", *args)
    assert offline.returncode == 0 and offline.stdout == want.stdout, offline.stderr
    resolved = subprocess.run([sys.executable, "-c", "from spqt import hub; print(hub.resolve('hf:o/split'))"],
                              capture_output=True, text=True, env=env, timeout=120)
    first = Path(resolved.stdout.strip())
    assert first.name == "m-Q4_K_M-00001-of-00002.gguf" and first.read_bytes() == b"GGUF1", resolved.stderr
    assert (first.parent / "m-Q4_K_M-00002-of-00002.gguf").read_bytes() == b"GGUF2"
    assert not (first.parent / "mmproj-m-f16.gguf").exists()
    for name, words in [("hf:o/gated", "hf:o/gated is gated: accept its terms at https://huggingface.co/o/gated and "
                                       "set HF_TOKEN"),
                        ("hf:o/none", "hf:o/none: no such repo on the Hugging Face Hub (or a private one: set HF_TOKEN)")]:
        bad = spqt(env, "generate", name, *args)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"spqt: error: {words}"], bad.stderr
    for name, words in [("hf:o/gated", "cannot get hf:o/gated from the Hugging Face Hub: OfflineModeIsEnabled"),
                        ("hf:o/split:Q8_0", "hf:o/split:Q8_0 (offline: the cached files): Q8_0 names none")]:
        miss = spqt({**env, "HF_HUB_OFFLINE": "1"}, "generate", name, *args)
        assert miss.returncode == 2 and len(miss.stderr.strip().splitlines()) == 1, miss.stderr
        assert words in miss.stderr, miss.stderr


def test_calibrate_will_not_write_into_the_hub_cache(monkeypatch, tiny_spqt, capsys):
    from spqt.cli import main

    monkeypatch.setattr(hub, "resolve", lambda name: tiny_spqt)
    assert main(["calibrate", "hf:o/tiny-spqt", "--data", __file__]) == 2
    assert "write the calibrated model with -o" in capsys.readouterr().err


FAKED_GPU = '''
"""spqt's commands in one process on a GPU faked (torch.cuda.is_available as each command says; a decode row's
process faked, its model recorded): argv[1] a JSON list of [gpu, argv]; a JSON line each (rc, stdout, stderr, the rows'
models, the repos in huggingface_hub's cache after it)."""
import contextlib, io, json, os, sys
from pathlib import Path
import torch
import spqt.bench, spqt.bench_decode
from spqt.cli import main
from spqt.kernels import tuning

torch.cuda.get_device_name = lambda *a: "test-gpu"
tuning.device_key = lambda: "test-gpu"
tuning.sm_count = lambda: 132
ran = []

def row_in_child(args, model, fmt, layout, sparsity, log, env=None):
    ran.append(model)
    return {"copy_gbps": 1.0, "rows": [{"model": model, "type": fmt, "layout": layout, "sparsity": sparsity,
                                        "tokens_per_s": 1.0, "model_key": fmt + ":tiny"}]}

spqt.bench_decode._row_in_child = row_in_child
spqt.bench.tune = lambda shapes, variants: {v: {f"{n}x{k}": {"us": 1.0} for n, k in shapes} for v in variants}
spqt.bench.tune_types = lambda shapes, types, kinds: {f"zigzag_{kind}_{t}": {f"{n}x{k}": {"us": 1.0} for n, k in shapes}
                                                      for t in types for kind in kinds}
for gpu, argv in json.loads(sys.argv[1]):
    torch.cuda.is_available = lambda gpu=gpu: gpu
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    repos = sorted(p.name for p in (Path(os.environ["HF_HOME"]) / "hub").glob("models--*"))
    print(json.dumps({"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "ran": ran[:], "repos": repos}))
    ran.clear()
'''


def test_bench_decode_and_tune_take_hub_names(fake_hub, tiny_spqt, tmp_path):
    """spqt bench decode --model and spqt tune --model and --routes take hub names (the GPU and the timing faked):
    the name downloaded once, after the GPU check, every row loading its file, the rows and the routes' entries
    carrying the name; tune's table goes to this GPU's user table, never into huggingface_hub's cache, and neither
    command writes its output over the cached model; a GGUF repo is told to quantize by its name."""
    env, home = fake_hub
    FakeHub.REPOS["o/tiny-spqt"] = {"README.md": b"# tiny", "tiny.spqt": tiny_spqt.read_bytes()}
    cached = home / "hub" / "models--o--tiny-spqt" / "snapshots" / FakeHub.COMMIT / "tiny.spqt"
    report, tables = tmp_path / "decode.json", tmp_path / "tuned"
    commands = [[False, ["tune", "--model", "hf:o/tiny-spqt"]],
                [True, ["bench", "decode", "--model", "hf:o/tiny-spqt", "--layouts", "zigzag", "--sparsity", "0,0.5",
                        "--json", str(report)]],
                [True, ["tune", "--model", "hf:o/tiny-spqt"]],
                [True, ["tune", "--routes", "hf:o/tiny-spqt", "--route-levels", "0.5", "--route-rounds", "1"]],
                [True, ["tune", "--model", "hf:o/tiny-spqt", "--output", str(cached)]],
                [True, ["bench", "decode", "--model", "hf:o/tiny-spqt", "--json", str(cached)]],
                [True, ["tune", "--model", "hf:o/split"]]]
    run = subprocess.run([sys.executable, "-c", FAKED_GPU, json.dumps(commands)], capture_output=True, text=True,
                         timeout=300, env={**env, "SPQT_TUNED": str(tables), "SPQT_COMMIT": "test"})
    assert run.returncode == 0, run.stderr
    no_gpu, decode, tune, routes, over_table, over_report, gguf = map(json.loads, run.stdout.splitlines())
    assert no_gpu["rc"] == 2 and "spqt tune needs a CUDA GPU" in no_gpu["err"] and not no_gpu["repos"], no_gpu
    assert decode["rc"] == 0 and decode["ran"] == [str(cached)] * 2, decode
    assert [(r["model"], r["sparsity"]) for r in json.loads(report.read_text())["rows"]] == [
        ("hf:o/tiny-spqt", 0.0), ("hf:o/tiny-spqt", 0.5)]
    table = tables / "test-gpu.json"
    assert tune["rc"] == 0 and f"wrote {table}" in tune["out"], tune
    assert "spqt tune --routes hf:o/tiny-spqt then" in tune["err"], tune
    assert routes["rc"] == 0 and routes["ran"] == [str(cached)] * 4, routes  # (the dense step and three routes)
    assert json.loads(table.read_text())["entries"]["step_routes"]["q4_k:tiny"]["model"] == "hf:o/tiny-spqt"
    assert over_table["rc"] == 2 and f"the output --output {cached} is also the model" in over_table["err"]
    assert over_report["rc"] == 2 and f"the output --json {cached} is also the model" in over_report["err"]
    assert gguf["rc"] == 2 and gguf["err"].strip() == (
        "spqt: error: hf:o/split: spqt tune --model times a .spqt model's maps; quantize it first (spqt quantize "
        "hf:o/split -o model.spqt)")
    # the cache holds the two repos' files, unchanged (refs, blobs and their snapshot links besides)
    assert cached.read_bytes() == tiny_spqt.read_bytes()
    snapshots = sorted(p.relative_to(home / "hub").as_posix() for p in (home / "hub").glob("models--*/snapshots/*/*"))
    assert snapshots == [f"models--o--split/snapshots/{FakeHub.COMMIT}/{f}" for f in
                         ("m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf")] + [
        f"models--o--tiny-spqt/snapshots/{FakeHub.COMMIT}/tiny.spqt"]
    assert sorted(p.name for p in tables.iterdir()) == ["test-gpu.json"]
