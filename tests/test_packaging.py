"""What an installed (non-editable) spqt meets: source that runs on the oldest Python that pyproject admits, and
benchmark provenance taken from the package's checkout, not the working directory."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "spqt"


def test_source_runs_on_the_oldest_admitted_python():
    """vermin finds no syntax or stdlib name newer than requires-python (datetime.UTC, 3.11, broke every quantize
    on 3.10); ~2 s."""
    oldest = metadata.metadata("spqt")["Requires-Python"].removeprefix(">=")
    run = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--no-tips",
                          "--violations", "--eval-annotations", f"--target={oldest}-", str(SRC)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_benchmark_commit_is_the_packages_not_the_working_directorys(tmp_path, monkeypatch):
    """A benchmark run from another git checkout records the commit of the spqt it ran, not that checkout's."""
    from spqt.bench import git_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "other"], check=True)
    other = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, check=True).stdout.strip()
    monkeypatch.delenv("SPQT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert not git_commit().startswith(other)
