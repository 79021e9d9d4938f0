"""Regenerate docs/configuration.md from the settings' help strings: `python docs/gen_config.py`."""

from pathlib import Path

from modpo_pipe.config import reference_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "configuration.md"
    target.write_text(reference_markdown(), encoding="utf-8")
    print(f"wrote {target}")
