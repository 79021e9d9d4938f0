"""The `modpo-pipe` command: a thin layer that reads settings, runs one stage and prints a summary.

Each stage command gets one flag per setting of its config sections, derived from the dataclasses in
config.py, so every key of modpo.toml can be overridden on the command line. Heavy imports (torch,
transformers) happen inside the commands: `modpo-pipe --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from modpo_pipe import config as cfg
from modpo_pipe.errors import ModpoError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Align one policy to several reward models (MODPO, reward-model-only form): generate -> score -> train.",
)

EXIT_FAILURE = 1


@contextmanager
def user_errors() -> Iterator[None]:
    """A ModpoError is the user's to fix: one line on stderr, no traceback."""
    try:
        yield
    except ModpoError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_FAILURE) from None


def _setting_parameters(sections: list[str]) -> list[inspect.Parameter]:
    params = []
    for section in sections:
        cls = cfg.SECTIONS[section]
        types = cfg.field_types(cls)
        for f in dataclasses.fields(cls):
            flag, tp = cfg.flag_name(f), types[f.name]
            help_text = f"[{section}].{f.name}: {f.metadata['help']}"
            if tp is bool:
                option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, show_default=False)
                annotation: Any = Optional[bool]
            elif typing.get_origin(tp) in (list, dict):
                option = typer.Option(None, flag, help=help_text + " (repeatable or comma-separated)",
                                      show_default=False)
                annotation = Optional[list[str]]
            else:
                option = typer.Option(None, flag, help=help_text, show_default=False)
                annotation = Optional[tp]
            params.append(inspect.Parameter(f"{section}__{f.name}", inspect.Parameter.KEYWORD_ONLY,
                                            default=option, annotation=annotation))
    return params


CONFIG_PARAM = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
    default=typer.Option(None, "--config", "-c", help="Settings file (default: ./modpo.toml when present)."),
)


def stage_command(name: str, sections: list[str], inputs: inspect.Parameter, help: str) -> Callable:
    """Register a command whose flags are `inputs`, --config and one flag per setting of `sections`."""

    def register(run: Callable[[cfg.Settings, Any], None]) -> Callable:
        def command(**kwargs: Any) -> None:
            config_path = kwargs.pop("config")
            given = kwargs.pop(inputs.name)
            overrides: dict[str, dict[str, Any]] = {s: {} for s in cfg.SECTIONS}
            for key, value in kwargs.items():
                section, field_name = key.split("__", 1)
                overrides[section][field_name] = value
            with user_errors():
                settings = cfg.load_settings(config_path, overrides)
                run(settings, given)

        params = [inputs, CONFIG_PARAM, *_setting_parameters(sections)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = help
        app.command(name, help=help)(command)
        return run

    return register


def _print_summary(title: str, fields: dict[str, Any]) -> None:
    typer.secho(title, fg=typer.colors.GREEN, err=True)
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        typer.echo(f"  {key}: {value}", err=True)


def output_path(setting: str) -> Path:
    return Path(setting).resolve()


@stage_command(
    "generate", ["generate", "model"],
    inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Prompts: JSONL, Parquet or a saved datasets directory.")),
    help="Sample 2 responses per prompt from the policy -> pairs.parquet.",
)
def generate_command(settings: cfg.Settings, prompts: Path) -> None:
    from modpo_pipe.generate import run_generate

    report = run_generate(settings, prompts, output_path(settings.generate.out))
    _print_summary(f"wrote {report.out}", {
        "prompts": report.prompts, "pairs": report.pairs, "backend": report.backend,
        "skipped invalid prompts": report.skipped_invalid, "long prompts dropped": report.long_prompts_dropped,
        "long prompts truncated": report.long_prompts_truncated,
        "response tokens/s": report.response_tokens / max(report.seconds, 1e-9), "seconds": report.seconds,
    })


@stage_command(
    "score", ["score", "model"],
    inspect.Parameter("pairs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="A pairs.parquet written by generate.")),
    help="Score both responses of every pair with every reward, and cache reference log-probs -> scored.parquet.",
)
def score_command(settings: cfg.Settings, pairs: Path) -> None:
    from modpo_pipe.score import run_score

    report = run_score(settings, pairs, output_path(settings.score.out))
    _print_summary(f"wrote {report.out}", {
        "pairs": report.pairs, "seconds": report.seconds,
        **{f"reward {n}": f"mean {s['mean']:.4g}, std {s['std']:.4g}" for n, s in report.rewards.items()},
    })


@stage_command(
    "train", ["train", "model"],
    inspect.Parameter("scored", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Path],
                      default=typer.Argument(..., help="One or more scored.parquet files.")),
    help="Train the policy on cached pairs with the RPO loss (no reference model loaded) -> checkpoint.",
)
def train_command(settings: cfg.Settings, scored: list[Path]) -> None:
    from modpo_pipe.train import train

    report = train(settings, list(scored), output_path(settings.train.out))
    _print_summary(f"wrote {report.out}/final", {
        "pairs": report.pairs, "dropped (identical responses)": report.dropped_identical,
        "optimizer steps": report.steps, "resumed from step": report.resumed_from,
        "first loss": report.first_loss, "last loss": report.last_loss,
        "first-batch |policy - ref| log-prob gap": report.first_batch_ref_gap, "seconds": report.seconds,
    })


@app.command("init")
def init_command(
    path: Path = typer.Argument(Path(cfg.DEFAULT_CONFIG_NAME), help="Where to write the settings file."),
    policy: str = typer.Option("", "--policy", help="Policy to write into [generate].policy."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=SPEC reward entries to write (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented modpo.toml with every setting and its default."""
    with user_errors():
        if path.exists() and not force:
            raise ModpoError(f"{path} exists; pass --force to overwrite")
        rewards = cfg.coerce(reward, dict[str, str], "--reward") if reward else {}
        path.write_text(cfg.render_template(policy=policy, rewards=rewards), encoding="utf-8")
        cfg.load_settings(path)  # what init writes must load
    typer.echo(f"wrote {path}")


@app.command("inspect")
def inspect_command(
    file: Path = typer.Argument(..., help="A pairs.parquet or scored.parquet."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Rows, schema version, metadata and reward statistics of a stage file."""
    from modpo_pipe.summary import summarize

    with user_errors():
        summary = summarize(file)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{file}: {summary['stage']} file, schema version {summary['schema_version']}, "
               f"{summary['rows']} rows")
    for key, value in summary.items():
        if key not in ("stage", "schema_version", "rows"):
            typer.echo(f"{key}: {json.dumps(value, indent=2) if isinstance(value, (dict, list)) else value}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
