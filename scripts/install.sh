#!/usr/bin/env bash
# Install clara into a virtual environment (default .venv) with the default plugins.
#   scripts/install.sh          clara-core + lora, qlora, transformers, merge and router plugins
#   scripts/install.sh --dev    also the test tools and every plugin that can be installed here (the gguf
#                               plugin's llama-cpp-python compiles once, about 5 minutes)
# torch is installed first and pinned (CLARA_TORCH, default torch==2.13.0, the CPU build on a CPU machine),
# so that nothing later pulls a multi-GB CUDA build; an already installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CLARA_VENV:-.venv}"
dev=0
[ "${1:-}" = "--dev" ] && dev=1
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)
# Tested versions of everything but torch (see the file); CLARA_NO_CONSTRAINTS=1 takes the newest instead.
[ "${CLARA_NO_CONSTRAINTS:-0}" = 1 ] || pip+=(-c scripts/constraints.txt)
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "Installing ${CLARA_TORCH:-torch==2.13.0} ..." >&2
  "$py" -m pip install --disable-pip-version-check -q "${CLARA_TORCH:-torch==2.13.0}"
fi
echo "Installing clara and its default plugins ..." >&2
"${pip[@]}" -e ".[ml,serve,plot]" \
  -e plugins/clara-plugin-lora \
  -e plugins/clara-plugin-qlora \
  -e plugins/clara-plugin-transformers \
  -e plugins/clara-plugin-merge \
  -e plugins/clara-plugin-router
if [ "$dev" = 1 ]; then
  echo "Installing test tools and optional plugins ..." >&2
  "${pip[@]}" -e ".[dev]" -e plugins/clara-plugin-dora -e plugins/clara-plugin-merge-ties
  # clara-plugin-gguf needs llama-cpp-python, which compiles llama.cpp the first time (about 5 minutes on 2
  # cores); pip caches the wheel, so later installs take seconds.
  "${pip[@]}" -e plugins/clara-plugin-gguf
  # vLLM needs CUDA and pins its own torch: install the plugin without pulling vllm; its tests skip visibly.
  "${pip[@]}" --no-deps -e plugins/clara-plugin-vllm
fi
echo "Done: activate with '. $venv/bin/activate', then run 'clara --help'." >&2
