"""modpo-pipe: align one policy to several reward models with the reward-model-only MODPO recipe.

From Python: `from modpo_pipe import api`, then api.generate, api.score, api.train and api.run (docs/python-api.md).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "api"]


def __getattr__(name: str) -> Any:
    """`modpo_pipe.api` after a plain `import modpo_pipe`, imported on first use: every module imports this package
    (for __version__), and none of them needs the API loaded."""
    if name == "api":
        import importlib

        return importlib.import_module("modpo_pipe.api")
    raise AttributeError(f"module 'modpo_pipe' has no attribute {name!r}")
