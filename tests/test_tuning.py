"""The tuned tables (kernels/tuning.py): the user's own, outside the package, where it lives, when it replaces the
package's, and what `spqt tune` writes. CPU only: the GPU's name and key are faked."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spqt.kernels import tuning

KEY = "test-gpu"
PACKAGE = {"zigzag_dense": {"64x64": {"split": 1, "num_warps": 2, "chunks": 1, "us": 3.0},
                            "128x64": {"split": 2, "num_warps": 2, "chunks": 1, "us": 4.0}}}
USER = {"zigzag_dense": {"64x64": {"split": 5, "num_warps": 4, "chunks": 1, "us": 2.0}}}


def _write(path: Path, entries: dict, version: int = tuning.KERNEL_VERSION, created: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kernel_version": version, "entries": entries}
                               | ({"created": created} if created else {})))
    tuning._load_table.cache_clear()
    return path


@pytest.fixture
def package_table(tmp_path, monkeypatch) -> Path:
    """This fake GPU's package table (a file in tmp_path, holding PACKAGE) in place of the installed package's."""
    path = tmp_path / "package" / f"{KEY}.json"
    monkeypatch.setattr(tuning, "table_path", lambda key=None: path)
    monkeypatch.setattr(tuning, "device_key", lambda: KEY)
    return _write(path, PACKAGE)


def test_user_table_location(tmp_path, monkeypatch):
    """<folder>/<key>.json, the folder $SPQT_TUNED, else $XDG_DATA_HOME/spqt/tuned (absolute only, as the XDG spec
    asks), else ~/.local/share/spqt/tuned; the key this GPU's where none is given."""
    monkeypatch.setattr(tuning, "device_key", lambda: KEY)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("SPQT_TUNED", str(tmp_path / "mine"))
    assert tuning.user_table_path("k") == tmp_path / "mine" / "k.json"
    assert tuning.user_table_path() == tmp_path / "mine" / f"{KEY}.json"
    monkeypatch.delenv("SPQT_TUNED")
    assert tuning.user_table_path("k") == tmp_path / "data" / "spqt" / "tuned" / "k.json"
    for unusable in ("", "relative/data"):
        monkeypatch.setenv("XDG_DATA_HOME", unusable)
        assert tuning.user_table_path("k") == tmp_path / "home" / ".local" / "share" / "spqt" / "tuned" / "k.json"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert tuning.user_table_path("k") == tmp_path / "home" / ".local" / "share" / "spqt" / "tuned" / "k.json"


def test_user_table_replaces_the_package_table(package_table):
    """A user table of this kernel version is the table in use, whole (the package's other shapes are not merged in:
    spqt tune wrote it from the table in use); without one the package's is."""
    assert tuning.table_source()["path"] == str(package_table)
    assert tuning.table_entries("zigzag_dense") == PACKAGE["zigzag_dense"]
    user = _write(tuning.user_table_path(KEY), USER, created="user")
    assert tuning.table_source() == tuning.table_source(KEY) == {"path": str(user), "created": "user"}
    assert tuning.table_entries("zigzag_dense") == USER["zigzag_dense"]
    assert tuning.config("zigzag_dense", 64, 64)["split"] == 5
    assert tuning.config("zigzag_dense", 128, 64)["split"] != 2, "a package entry merged into the user table's"


def test_no_table_applies(tmp_path, monkeypatch):
    """Neither a user table nor a package table of this kernel version: no entries, table_source None (every shape
    runs its default)."""
    path = tmp_path / "package" / f"{KEY}.json"
    monkeypatch.setattr(tuning, "table_path", lambda key=None: path)
    monkeypatch.setattr(tuning, "device_key", lambda: KEY)
    tuning._load_table.cache_clear()
    assert tuning.table_source() is None and tuning.table_entries("zigzag_dense") == {}
    _write(path, PACKAGE, version=tuning.KERNEL_VERSION - 1)
    assert tuning.table_source() is None and tuning.table_entries("zigzag_dense") == {}
    _write(path, PACKAGE, created="shipped")
    assert tuning.table_source() == {"path": str(path), "created": "shipped"}


def test_user_table_of_another_kernel_version_is_ignored(package_table):
    """A user table written for another kernel version is not used (as the package's would not be): the package's."""
    _write(tuning.user_table_path(KEY), USER, version=tuning.KERNEL_VERSION - 1)
    assert tuning.table_entries("zigzag_dense") == PACKAGE["zigzag_dense"]
    assert tuning.table_source()["path"] == str(package_table)


NOT_TABLES = ["{not json", "[1, 2]", json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": [1]}), "\xff\xfe"]


@pytest.mark.parametrize("text", NOT_TABLES)
def test_unreadable_user_table_falls_back_with_a_warning(package_table, caplog, text):
    """A user table that is no tuned table (not JSON, not an object, entries not a dict, not UTF-8): the package's
    entries, with one warning that names the file, no exception; table_source says the package's."""
    user = tuning.user_table_path(KEY)
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_bytes(text.encode("latin-1"))
    tuning._load_table.cache_clear()
    with caplog.at_level(logging.WARNING, logger="spqt.kernels.tuning"):
        assert tuning.table_entries("zigzag_dense") == PACKAGE["zigzag_dense"]
        assert tuning.table_entries("zigzag_sparse") == {}  # (loaded once: no second warning)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert str(user) in caplog.records[0].getMessage()
    assert tuning.table_source()["path"] == str(package_table)


def test_unreadable_user_table_is_one_line_on_stderr(tmp_path):
    """The runtime's view of a corrupt user table, in a fresh process without logging set up: one line on stderr,
    no traceback, the package's table (here none: {})."""
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / f"{KEY}.json").write_text("{not json")
    code = f"from spqt.kernels import tuning; print(tuning._load_table({KEY!r}))"
    env = {**os.environ, "SPQT_TUNED": str(folder)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout == "{}\n", done
    err = done.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: warning: ") and str(folder / f"{KEY}.json") in err[0], err


def test_save_table_writes_the_user_table(package_table, tmp_path, monkeypatch):
    """save_table without a path writes the user table (its folders made), the package's untouched, and the next
    read sees it; with a path, that file."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: KEY)
    monkeypatch.setenv("SPQT_TUNED", str(tmp_path / "new" / "tuned"))
    before = package_table.read_text()
    assert tuning.table_entries("zigzag_dense") == PACKAGE["zigzag_dense"]  # (loaded: save_table must forget it)
    path = tuning.save_table(USER)
    assert path == tmp_path / "new" / "tuned" / f"{KEY}.json" == tuning.user_table_path()
    assert json.loads(path.read_text())["kernel_version"] == tuning.KERNEL_VERSION
    assert tuning.table_entries("zigzag_dense") == USER["zigzag_dense"] and tuning.table_source()["path"] == str(path)
    assert package_table.read_text() == before
    elsewhere = tuning.save_table(PACKAGE, path=tmp_path / "out.json")
    assert elsewhere == tmp_path / "out.json" and tuning.table_entries("zigzag_dense") == USER["zigzag_dense"]


def test_tune_starts_from_the_package_table_and_writes_the_user_table(package_table, tmp_path, monkeypatch, capsys):
    """spqt tune (GPU faked, timing faked) without a user table: it starts from the package's entries, writes them
    with its own to the user table (says where), leaves the package's alone; the next tune starts from the user
    table; --output writes elsewhere, the user table unchanged."""
    import torch

    import spqt.bench
    from spqt.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: KEY)
    monkeypatch.setattr(tuning, "sm_count", lambda: 132)  # (no device properties here)
    timed = {"zigzag_dense": {"256x64": {"split": 3, "num_warps": 2, "chunks": 1, "us": 1.0}}}
    monkeypatch.setattr(spqt.bench, "tune", lambda shapes, variants: timed)
    before = package_table.read_text()
    assert main(["tune", "--shapes", "256x64"]) == 0
    user = tuning.user_table_path(KEY)
    assert capsys.readouterr().out.splitlines() == [f"wrote {user}"]
    assert json.loads(user.read_text())["entries"]["zigzag_dense"] == PACKAGE["zigzag_dense"] | timed["zigzag_dense"]
    assert package_table.read_text() == before
    _write(package_table, {})  # the next tune reads the user table, not the package's
    timed = {"zigzag_dense": {"512x64": {"split": 4, "num_warps": 2, "chunks": 1, "us": 1.0}}}
    assert main(["tune", "--shapes", "512x64"]) == 0
    entries = json.loads(user.read_text())["entries"]["zigzag_dense"]
    assert set(entries) == {"64x64", "128x64", "256x64", "512x64"}
    kept = user.read_text()
    assert main(["tune", "--shapes", "512x64", "--output", str(tmp_path / "out.json")]) == 0
    assert user.read_text() == kept and (tmp_path / "out.json").is_file()
