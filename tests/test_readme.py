"""The README's promises that can drift: its set-up and test commands are the ones CI runs, every CLI command is
in it with a link to its details, and the commands in its code blocks (and docs/'s) use commands and flags that
exist."""

import re
from pathlib import Path

import pytest
import typer

from modpo_pipe.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = typer.main.get_command(app).commands
# Where a shell command line ends: a comment, a redirect, a pipe, the next command.
END = re.compile(r"^(#|>>?|\||;|&&)|;$")


def test_ci_runs_the_readme_test_command():
    assert "./dev.sh test" in README and "./dev.sh demo" in README
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text()


def test_every_command_is_in_the_readme_with_a_link_to_its_details():
    for name in COMMANDS:
        rows = [line for line in README.splitlines() if line.startswith(f"| `modpo-pipe {name}` |")]
        assert len(rows) == 1, f"`modpo-pipe {name}` has no row in the README's command table"
        assert re.search(r"\]\((docs/[\w-]+\.md|#[\w-]+)", rows[0]), f"`modpo-pipe {name}`: no link to details"


def command_lines(text: str) -> list[list[str]]:
    """The words after `modpo-pipe` (or `-m modpo_pipe`) in the shell code blocks and the inline code spans."""
    blocks = [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S) if lang in ("", "bash", "sh")]
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for line in [line for b in blocks for line in b.replace("\\\n", " ").splitlines()] + spans:
        words = line.replace('"', " ").split()
        for i, word in enumerate(words):
            if word.endswith("modpo-pipe") or (word == "modpo_pipe" and i > 0 and words[i - 1] == "-m"):
                tail = []
                for w in words[i + 1:]:
                    if END.search(w):
                        break
                    tail.append(w)
                if tail and not tail[0].isupper():  # `modpo-pipe COMMAND --help` names no command
                    found.append(tail)
    return found


@pytest.mark.parametrize("page", ["README.md", "docs/guide.md", "docs/scaling.md", "docs/experiments.md"])
def test_documented_commands_use_commands_and_flags_that_exist(page):
    lines = command_lines((ROOT / page).read_text(encoding="utf-8"))
    assert lines, page
    for words in lines:
        command = COMMANDS.get(words[0])
        assert command is not None, f"{page}: `modpo-pipe {' '.join(words)}`: no command {words[0]}"
        options = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
        for word in words[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{page}: `modpo-pipe {' '.join(words)}`: no flag {word}"
