"""What an installed (non-editable) spqt needs: source that runs on the oldest Python that pyproject admits."""

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
