"""What every `modpo-pipe` command shares: the one-line error and its exit, a flag per setting, the summary.

cli.py registers the commands with these; api.py and the launcher never need them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from modpo_pipe import config as cfg
from modpo_pipe.errors import ModpoError, environment_error

EXIT_FAILURE = 1


@contextmanager
def user_errors() -> Iterator[None]:
    """A ModpoError is the user's to fix: one line on stderr, no traceback."""
    try:
        yield
    except ModpoError as e:
        error_line(e)
        raise typer.Exit(EXIT_FAILURE) from None
    except OSError as e:
        environment_exit(e)


def error_line(error: Exception) -> None:
    """The one `error:` line; in a multi-process run, from the first process only (every process meets the same
    bad input, and N copies of one line read like N problems), and the launcher adds the lines it did not meet."""
    from modpo_pipe.launcher import record_error

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    several = rank.isdigit() and world.isdigit() and int(world) > 1
    if several:  # the launcher prints what this process met and the first did not (modpo_pipe/launcher.py)
        record_error(int(rank), str(error))
    if not (several and int(rank) > 0):
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)


def environment_exit(e: OSError) -> None:
    """A full disk, a read-only or forbidden path: one line and exit 1. Any other OSError goes on (a bug)."""
    error = environment_error(e)
    if error is None:
        raise e
    error_line(error)
    raise typer.Exit(EXIT_FAILURE) from None


def setting_parameters(sections: list[str], prefixed: bool = False,
                        skip: frozenset[tuple[str, str]] = frozenset()) -> list[inspect.Parameter]:
    """One flag per setting of `sections`; `prefixed` names them --SECTION-KEY (for commands spanning
    sections that share key names), `skip` leaves (section, key) pairs out."""
    params = []
    seen: set[str] = set()
    for section in sections:
        cls = cfg.SECTIONS[section]
        types = cfg.field_types(cls)
        for f in dataclasses.fields(cls):
            if (section, f.name) in skip:
                continue
            flag, tp = cfg.flag_name(f), types[f.name]
            aliases = cfg.flag_aliases(f)
            if prefixed:
                flag, aliases = f"--{section}-{flag[2:]}", tuple(f"--{section}-{a[2:]}" for a in aliases)
            if flag in seen:  # a command spanning sections exposes a shared name (out) once, for the first
                continue
            seen.add(flag)
            help_text = f"[{section}].{f.name}: {f.metadata['help']}"
            if tp is bool:
                option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
                annotation: Any = Optional[bool]
            elif typing.get_origin(tp) in (list, dict):
                option = typer.Option(None, flag, help=help_text + " (repeatable or comma-separated)",
                                      show_default=False)
                annotation = Optional[list[str]]
            else:
                option = typer.Option(None, flag, *aliases, help=help_text, show_default=False)
                annotation = Optional[tp]
            params.append(inspect.Parameter(f"{section}__{f.name}", inspect.Parameter.KEYWORD_ONLY,
                                            default=option, annotation=annotation))
    return params


CONFIG_PARAM = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
    default=typer.Option(None, "--config", "-c", help="Settings file (default: ./modpo.toml when present)."),
)


def print_summary(title: str, fields: dict[str, Any]) -> None:
    typer.secho(title, fg=typer.colors.GREEN, err=True)
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        typer.echo(f"  {key}: {value}", err=True)


def extra_option(name: str, annotation: Any, default: Any, flag: str, help: str,
                 aliases: tuple[str, ...] = ()) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, flag, *aliases, help=help))


def shard_option(output: str) -> inspect.Parameter:
    return extra_option(
        "shard", Optional[str], None, "--shard",
        f"I/N: compute only shard I of N (0-based, e.g. $SLURM_ARRAY_TASK_ID/N) into "
        f"{output}.shards/IIIII-of-NNNNN.parquet (zero-padded); "
        f"run all N (anywhere, side by side), then join them with `modpo-pipe merge {output}.shards`.")


def shard_summary(report: Any, shard: tuple[int, int]) -> None:
    print_summary(f"wrote shard {shard[0]}/{shard[1]}: {report.out}", {
        "groups": report.groups, "seconds": report.seconds,
        "next": f"once all {shard[1]} shards are written: modpo-pipe merge {Path(report.out).parent}",
    })


def policy_specs(items: list[str]) -> dict[str, str]:
    """`--policies` values -> label: path. PATH must be a directory here (its name is the label); a hub id
    needs LABEL=ID. Checked before anything loads: a bare name would otherwise be looked up on the hub."""
    labelled: dict[str, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            if not Path(item).is_dir():
                raise ModpoError(f"--policies {item!r}: no such directory; give PATH (a model directory) or "
                                 "LABEL=PATH (a directory or a hub id)")
            label, path = Path(item).resolve().name, item
        label, path = label.strip(), path.strip()
        if not label or not path:
            raise ModpoError(f"--policies {item!r}: expected PATH or LABEL=PATH, with neither part empty")
        if label == "reference":
            raise ModpoError(f"--policies {item!r}: the label 'reference' is the reference's own; choose another")
        if label in labelled:
            raise ModpoError(f"--policies: label {label!r} is given twice; name them LABEL=PATH")
        labelled[label] = str(Path(path).resolve()) if Path(path).exists() else path
    return labelled
