#!/usr/bin/env bash
# Fills .whl (ignored by git) with the wheels the device machine's image lacks, for Python 3.12 on
# x86_64: gguf (every test that reads a GGUF file), llguidance (structured output) and the serve stack (fastapi,
# uvicorn with httptools, pydantic, prometheus_client, the openai client, what they need), at the versions this
# checkout's .venv holds. Not uvloop (4.4 MB; uvicorn runs asyncio's loop without it): .whl travels beside the default model's first
# xz part, under the carry's 64 MiB. Carry .whl in every device call; scripts/gpu_session.sh installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
names="gguf fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions
opentelemetry-api annotated-doc openai httpx2 httpcore2 truststore jiter sniffio anyio h11 httptools llguidance
prometheus_client"
pins=$($PY - $names <<'PYEOF'
import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))
PYEOF
)
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
