"""The README's promises that can drift: its config reference is what `init` writes, and its set-up and test
commands are the ones CI runs."""

from pathlib import Path

from modpo_pipe.config import render_template

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_is_what_init_writes():
    assert render_template().rstrip() in README


def test_ci_runs_the_readme_test_command():
    assert "./dev.sh test" in README and "./dev.sh demo" in README
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text()
