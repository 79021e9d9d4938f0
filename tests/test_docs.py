"""docs/ cannot drift from the code: the configuration reference is what the settings generate and lists exactly
what `modpo-pipe init` writes, its flags exist, and every link in the README and docs/ lands on a file and
heading that exist."""

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from modpo_pipe import config as cfg
from modpo_pipe.cli import app

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The command that reads each section's flags unprefixed.
SECTION_COMMAND = {"model": "generate", "generate": "generate", "score": "score", "train": "train", "run": "run"}


def documented_settings(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{section: {key: (default as TOML, flag)}} from the tables of docs/configuration.md."""
    sections: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        heading = re.fullmatch(r"## \[(\w+)\]", line)
        if heading:
            current = sections.setdefault(heading.group(1), {})
            continue
        row = re.match(r"\| `(\w+)` \| `(.*?)` \| `(--[\w-]+)` \|", line)
        if row and current is not None:
            current[row.group(1)] = (row.group(2), row.group(3))
    return sections


def test_configuration_doc_is_the_generated_text():
    assert CONFIG_DOC.read_text(encoding="utf-8") == cfg.reference_markdown(), (
        "docs/configuration.md is stale: run `python docs/gen_config.py`")


def test_configuration_doc_lists_exactly_what_init_writes(tmp_path):
    written = tmp_path / "modpo.toml"
    result = CliRunner().invoke(app, ["init", str(written)])
    assert result.exit_code == 0, result.output
    init = cfg.tomllib.loads(written.read_text(encoding="utf-8"))
    documented = documented_settings(CONFIG_DOC.read_text(encoding="utf-8"))
    assert list(documented) == list(init)
    for section, keys in init.items():
        assert set(documented[section]) == set(keys), section
        for key, value in keys.items():
            default = cfg.tomllib.loads(f"v = {documented[section][key][0]}")["v"]
            assert default == value, f"[{section}].{key}: docs say {default!r}, init writes {value!r}"


def test_configuration_doc_flags_exist():
    commands = typer.main.get_command(app).commands
    for section, keys in documented_settings(CONFIG_DOC.read_text(encoding="utf-8")).items():
        options = {o for p in commands[SECTION_COMMAND[section]].params for o in p.opts}
        for key, (_, flag) in keys.items():
            assert flag in options, f"[{section}].{key}: {flag} is no flag of `{SECTION_COMMAND[section]}`"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # `# comments` are no headings
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_land_on_files_and_headings_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"\w+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: link {link} names no file"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: link {link}: no such heading in {path.name}"
