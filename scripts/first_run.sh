#!/usr/bin/env bash
# Fresh clone of main, empty model cache, the shared venv (install excluded, as the issue asks):
# /usr/bin/time of the conversion alone and of make demo.
# Usage (from the repository root, after `make setup`): scripts/first_run.sh
set -u
REPO=$PWD
VENV=${VENV:-$PWD/.venv}
rm -rf /tmp/fresh /tmp/fresh-cache /tmp/fresh-cache2
git clone -q "$REPO" /tmp/fresh && cd /tmp/fresh && git log --oneline -1
uptime
PYTHONPATH=/tmp/fresh/src SPQT_CACHE=/tmp/fresh-cache /usr/bin/time -f "conversion: %e s wall, %U s user" ${VENV:-$PWD/.venv}/bin/python -c "from spqt.default_model import default_spqt; default_spqt()"
uptime
PYTHONPATH=/tmp/fresh/src SPQT_CACHE=/tmp/fresh-cache2 /usr/bin/time -f "make demo: %e s wall, %U s user" make -o ${VENV:-$PWD/.venv}/.installed demo VENV=${VENV:-$PWD/.venv}
uptime
