"""`spqt serve` started from a script (load_test.py, serve_probe.py, serve_soak.py): a process on a free port, and
its URL once it listens."""

import re
import subprocess
import sys
import time
from pathlib import Path


def start_serve(model: str | None, options: list[str], log: Path) -> tuple[subprocess.Popen, str, float]:
    """`spqt serve [MODEL] --port 0 OPTIONS`, its output in `log`: (the process, its URL, seconds from the start until
    it listened). A server that exits first is a SystemExit that prints its log."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "spqt.cli", "serve", *([model] if model else []), "--port", "0", *options]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    while not (found := re.search(r"listening on (\S+)", log.read_text(errors="replace"))):
        if proc.poll() is not None:
            raise SystemExit(f"spqt serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.5)
    return proc, found.group(1), time.perf_counter() - t0
