"""spqt.hub: Hugging Face Hub names (parsing, which file a tag picks, a checkpoint's files, the errors) against a
stand-in for huggingface_hub's functions (no network in the tests), and the CLI running a hub checkpoint."""

import pytest

from spqt import hub
from spqt.errors import SpqtError

BARTOWSKI = ["README.md", "Qwen2.5-0.5B-Instruct-IQ4_XS.gguf", "Qwen2.5-0.5B-Instruct-Q4_K_L.gguf",
             "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "Qwen2.5-0.5B-Instruct-Q4_K_S.gguf", "Qwen2.5-0.5B-Instruct-Q8_0.gguf",
             "Qwen2.5-0.5B-Instruct-f16.gguf", "Qwen2.5-0.5B-Instruct-Q4_K.gguf"]


def test_names_parse():
    assert hub.parse("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF") == ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", None)
    assert hub.parse("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M") == (
        "bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M")
    assert hub.parse("https://huggingface.co/org/m.v1:model.gguf") == ("org/m.v1", "model.gguf")
    assert hub.is_hub_name("hf:a/b") and not hub.is_hub_name("models/a.gguf") and not hub.is_hub_name(None)
    for bad in ("hf:only-a-name", "hf:a/b/c", "hf:a/b:", "hf.co/", "hf:a b/c"):
        with pytest.raises(SpqtError, match="hf:ORG/REPO"):
            hub.parse(bad)


def test_a_tag_picks_its_file_whole():
    name = "hf:bartowski/Qwen2.5-0.5B-Instruct-GGUF"
    assert hub.choose(name, BARTOWSKI, "Q4_K_M") == "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"
    assert hub.choose(name, BARTOWSKI, "q8_0") == "Qwen2.5-0.5B-Instruct-Q8_0.gguf"  # any case
    assert hub.choose(name, BARTOWSKI, "Q4_K") == "Qwen2.5-0.5B-Instruct-Q4_K.gguf"  # not Q4_K_M, Q4_K_S, Q4_K_L
    assert hub.choose(name, BARTOWSKI, "Qwen2.5-0.5B-Instruct-f16.gguf") == "Qwen2.5-0.5B-Instruct-f16.gguf"
    assert hub.choose(name, BARTOWSKI, None) == "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf"  # llama.cpp's default
    assert hub.choose(name, ["README.md", "sub/m-Q2_K.gguf"], None) == "sub/m-Q2_K.gguf"  # the only one
    assert hub.choose(name, ["a.spqt", "config.json"], None) == "a.spqt"
    assert hub.choose(name, ["config.json", "model.safetensors"], None) is None  # a checkpoint
    with pytest.raises(SpqtError, match="Q3_K_M names none of its files .*Q8_0.gguf"):
        hub.choose(name, BARTOWSKI, "Q3_K_M")
    with pytest.raises(SpqtError, match="XS names none"):  # (IQ4_XS's part is IQ4_XS, not XS)
        hub.choose(name, BARTOWSKI, "XS")
    with pytest.raises(SpqtError, match="no Q4_K_M: add :TAG"):
        hub.choose(name, ["a-Q8_0.gguf", "a-Q6_K.gguf"], None)
    with pytest.raises(SpqtError, match="no .gguf or .spqt files, so no Q4_K_M"):
        hub.choose(name, ["config.json"], "Q4_K_M")
    split = ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q8_0.gguf"]
    with pytest.raises(SpqtError, match="split into 2 parts: merge them first"):
        hub.choose(name, split, "Q4_K_M")
    with pytest.raises(SpqtError, match="one part of a split GGUF"):
        hub.choose(name, ["m-00001-of-00003.gguf"], None)


class RepositoryNotFoundError(Exception):  # (huggingface_hub's own wants an HTTP response to be made)
    pass


class StandIn:
    """huggingface_hub's list_repo_files, hf_hub_download and snapshot_download over a dict of repos (their files
    at local paths); calls recorded; offline: the listing fails as without a network."""

    def __init__(self, monkeypatch, repos: dict[str, dict[str, str]], cached: dict[str, str] | None = None,
                 offline: bool = False):
        import huggingface_hub

        self.repos, self.cached, self.offline, self.calls = repos, cached or {}, offline, []
        monkeypatch.setattr(huggingface_hub, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def list_repo_files(self, repo):
        if self.offline:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nto load the files")
        if repo not in self.repos:
            raise RepositoryNotFoundError(f"404 Client Error.\nRepository Not Found for url: .../{repo}")
        return list(self.repos[repo])

    def hf_hub_download(self, repo, filename):
        self.calls.append(("file", repo, filename))
        return self.repos[repo][filename]

    def snapshot_download(self, repo, local_files_only=False, allow_patterns=None, ignore_patterns=None):
        self.calls.append(("snapshot", repo, local_files_only, allow_patterns, ignore_patterns))
        if local_files_only:
            if repo not in self.cached:
                raise FileNotFoundError("not in the cache")
            return self.cached[repo]
        return self.repos[repo]["."]


def test_resolve_downloads_the_chosen_file_or_the_checkpoint(monkeypatch, tmp_path):
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "m-Q8_0.gguf").write_bytes(b"GGUF")
    stand = StandIn(monkeypatch, {"o/gguf": {f: f"/cache/{f}" for f in BARTOWSKI},
                                  "o/ckpt": {"config.json": "", "model.safetensors": "", ".": "/cache/ckpt"}},
                    cached={"o/cached": str(tmp_path / "snap")})
    assert str(hub.resolve("hf:o/gguf:Q8_0")) == "/cache/Qwen2.5-0.5B-Instruct-Q8_0.gguf"
    assert str(hub.resolve("hf:o/ckpt")) == "/cache/ckpt"
    assert stand.calls == [("file", "o/gguf", "Qwen2.5-0.5B-Instruct-Q8_0.gguf"),
                           ("snapshot", "o/ckpt", False, hub.CHECKPOINT_FILES, hub.NOT_CHECKPOINT)]
    with pytest.raises(SpqtError) as e:
        hub.resolve("hf:o/missing")
    assert "cannot get hf:o/missing from the Hugging Face Hub: RepositoryNotFoundError" in str(e.value)
    assert "\n" not in str(e.value)
    offline = StandIn(monkeypatch, {"o/cached": {"m-Q8_0.gguf": "/cache/m-Q8_0.gguf"}},
                      cached={"o/cached": str(tmp_path / "snap")}, offline=True)
    assert str(hub.resolve("hf:o/cached")) == "/cache/m-Q8_0.gguf"  # offline: the cached snapshot's listing
    with pytest.raises(SpqtError, match="cannot get hf:o/gone .*OSError: We couldn't connect"):
        hub.resolve("hf:o/gone")
    assert offline.calls[-1][:3] == ("snapshot", "o/gone", True)


def test_the_cli_runs_a_hub_checkpoint(monkeypatch, tiny_hf, capsys):
    """spqt generate hf:ORG/REPO: the checkpoint the hub gives, as its folder runs; a hub error is one line, exit 2."""
    from spqt.cli import main

    StandIn(monkeypatch, {"o/tiny": {"config.json": "", "model.safetensors": "", ".": str(tiny_hf)}})
    args = ["-p", "the quick", "-n", "5", "--device", "cpu", "--gemv", "fp32"]
    assert main(["generate", str(tiny_hf), *args]) == 0
    want = capsys.readouterr().out
    assert main(["generate", "hf:o/tiny", *args]) == 0
    assert capsys.readouterr().out == want
    assert main(["generate", "hf:o/absent", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error: cannot get hf:o/absent from the Hugging Face Hub")
