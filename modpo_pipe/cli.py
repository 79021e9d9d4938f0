"""The `modpo-pipe` command: a thin layer that reads settings, runs one stage and prints a summary.

Each stage command gets one flag per setting of its config sections, derived from the dataclasses in
config.py, so every key of modpo.toml can be overridden on the command line. Heavy imports (torch,
transformers) happen inside the commands: `modpo-pipe --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from modpo_pipe import api
from modpo_pipe import config as cfg
from modpo_pipe.cli_options import (
    CONFIG_PARAM,
    EXIT_FAILURE,
    environment_exit,
    error_line,
    extra_option,
    policy_specs,
    print_summary,
    setting_parameters,
    shard_option,
    shard_summary,
    user_errors,
)
from modpo_pipe.errors import ModpoError
from modpo_pipe.launcher import given_arguments, launch_train
from modpo_pipe.roles import fields_where

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts name keys as [section].key, which rich markup would swallow
    help="Align one policy to several reward models (MODPO, reward-model-only form): generate -> score -> train.",
)

def stage_command(name: str, sections: list[str], inputs: inspect.Parameter, help: str,
                  extra: tuple[inspect.Parameter, ...] = (),
                  skip: frozenset[tuple[str, str]] = frozenset()) -> Callable:
    """Register a command whose flags are `inputs`, --config, `extra` (passed to the command by name) and
    one flag per setting of `sections` but those in `skip` (an `extra` of the same flag name would otherwise
    lose its value to the setting's flag)."""

    def register(run: Callable[..., None]) -> Callable:
        def command(**kwargs: Any) -> None:
            config_path = kwargs.pop("config")
            given = kwargs.pop(inputs.name)
            extras = {p.name: kwargs.pop(p.name) for p in extra}
            overrides: dict[str, dict[str, Any]] = {s: {} for s in cfg.SECTIONS}
            for key, value in kwargs.items():
                section, field_name = key.split("__", 1)
                overrides[section][field_name] = value
            with user_errors():
                settings = cfg.load_settings(config_path, overrides)
                run(settings, given, **extras)

        params = [inputs, CONFIG_PARAM, *extra, *setting_parameters(sections, skip=skip)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = help
        app.command(name, help=help)(command)
        return run

    return register


@stage_command(
    "generate", ["generate", "model"],
    inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Prompts: JSONL, Parquet or a saved datasets directory.")),
    help="Sample N responses per prompt (--samples-per-prompt, default 2) from the policy -> pairs.parquet, one "
         "row (group) per prompt.",
    extra=(shard_option("pairs"),),
)
def generate_command(settings: cfg.Settings, prompts: Path, shard: str | None) -> None:
    from modpo_pipe.shards import parse_shard

    part = parse_shard(shard) if shard else None
    report = api.generate(prompts, settings=settings, shard=part)
    if part:
        return shard_summary(report, part)
    if report.up_to_date:
        print_summary(f"nothing to do: {report.out} is already written from these prompts, this policy and these "
                       "settings", {"prompts": report.prompts, "groups": report.groups})
        return
    print_summary(f"wrote {report.out}", {
        "prompts": report.prompts, "groups": report.groups, "backend": report.backend,
        "skipped invalid prompts": report.skipped_invalid, "long prompts dropped": report.long_prompts_dropped,
        "long prompts truncated": report.long_prompts_truncated,
        "chunks (reused from a killed run)": f"{report.chunks} ({report.resumed_chunks})",
        "response tokens/s": report.response_tokens / max(report.seconds, 1e-9), "seconds": report.seconds,
    })


@stage_command(
    "score", ["score", "model"],
    inspect.Parameter("pairs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="A pairs.parquet written by generate.")),
    help="Score every response of every group once with every reward, and cache reference log-probs -> "
         "scored.parquet.",
    extra=(shard_option("scored"),),
)
def score_command(settings: cfg.Settings, pairs: Path, shard: str | None) -> None:
    from modpo_pipe.shards import parse_shard

    part = parse_shard(shard) if shard else None
    report = api.score(pairs, settings=settings, shard=part)
    if part:
        return shard_summary(report, part)
    if report.up_to_date:
        print_summary(f"nothing to do: {report.out} is already scored from these pairs, with these rewards, this "
                       "reference and these settings", {"groups": report.groups})
        return
    print_summary(f"wrote {report.out}", {
        "groups": report.groups, "seconds": report.seconds,
        **{f"reward {n}": f"mean {s['mean']:.4g}, std {s['std']:.4g}" for n, s in report.rewards.items()},
        "responses dropped (NaN/inf/None reward)": str(report.dropped_invalid_responses)
        + (f" ({', '.join(f'{n}: {k}' for n, k in report.invalid_by_reward.items() if k)})"
           if report.dropped_invalid_responses else ""),
        "groups dropped (fewer than 2 responses left)": report.dropped_invalid_groups,
        "parts reused from a killed run": report.resumed_parts,
        "reward inputs cut to fit (prompt start)": ", ".join(f"{n}: {k}" for n, k in report.truncated_by_reward.items())
        or "0",
    })


@stage_command(
    "train", ["train", "model"],
    inspect.Parameter("scored", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Path],
                      default=typer.Argument(..., help="One or more scored.parquet files.")),
    help="Train the policy on cached groups with the RPO loss (no reference model loaded) -> checkpoint. "
         "Pairs are formed within each group (--pairs all|disjoint|max-min; max-min biases the target away from "
         "pi*: keeping only the extreme pair selects on the reward gap, so the teacher margins no longer match "
         "pairs drawn from the sampling policy). A batch is whole groups; each response is forwarded once a step "
         "and a group's loss is the mean over its pairs. "
         "Every file's rewards are z-scored with one set of statistics: the first file's, or those of "
         "--reward-stats FILE. Data-parallel on several processes under `accelerate launch -m modpo_pipe "
         "train ...` (DDP, FSDP or DeepSpeed, from the accelerate config), or with --num-processes N.",
    extra=(extra_option("num_processes", int, 1, "--num-processes",
                        "N > 1: train data-parallel on N processes on this machine (one per GPU; CPU processes "
                        "without GPUs) by running this command under `accelerate launch`. A step then takes "
                        "batch_size * grad_accum * N groups. FSDP, DeepSpeed, several machines: call "
                        "`accelerate launch` yourself."),
           inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)),
)
def train_command(settings: cfg.Settings, scored: list[Path], num_processes: int, ctx: typer.Context) -> None:
    if num_processes != 1:
        launch_train(num_processes, given_arguments(ctx, drop={"num_processes"}))
        return
    report = api.train(list(scored), settings=settings)
    if not report.main_process:
        return
    if report.up_to_date:
        print_summary(f"nothing to do: {report.out}/final is already trained from these files, this policy and "
                       "these settings", {"groups": report.groups, "pairs": report.pairs, "steps": report.steps})
        return
    print_summary(f"wrote {report.out}/final", {
        "groups": report.groups, "pairs": report.pairs,
        "pairs dropped (identical responses)": report.dropped_identical,
        "optimizer steps": report.steps, "resumed from step": report.resumed_from,
        "first loss": report.first_loss, "last loss": report.last_loss,
        "first-batch |policy - ref| log-prob gap": report.first_batch_ref_gap, "seconds": report.seconds,
        **({"processes": report.processes} if report.processes > 1 else {}),
    })


@app.command("merge")
def merge_command(
    shards: list[Path] = typer.Argument(..., help="The shard files, or directories of them (OUT.shards/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The merged file (default for one NAME.shards "
                                                           "directory: NAME.parquet beside it)."),
) -> None:
    """Join the shards that `generate --shard I/N` or `score --shard I/N` wrote into one pairs or scored file:
    the rows an unsharded run writes, in its order. Refuses missing, duplicate and mismatched shards."""
    from modpo_pipe.shards import default_output, merge

    with user_errors():
        report = merge(list(shards), out or default_output(list(shards)))
    print_summary(f"wrote {report.out}", {"stage": report.stage, "shards": report.shards, "groups": report.rows})


@stage_command(
    "sweep", ["train", "model"],
    inspect.Parameter("scored", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Path],
                      default=typer.Argument(..., help="One or more scored.parquet files.")),
    help="Train one policy per weight vector (a Pareto front) into OUT/w-<weights>/.",
    extra=(
        extra_option("grid", int, 3, "--grid", "With two rewards: this many evenly spaced weight vectors."),
        extra_option("vectors", Optional[list[str]], None, "--vector",
                     "A weight vector NAME=W,NAME=W (repeatable); overrides --grid."),
    ),
    skip=frozenset({("train", "weights")}),  # the sweep sets each policy's weights: a --weights would be ignored
)
def sweep_command(settings: cfg.Settings, scored: list[Path], grid: int, vectors: list[str] | None) -> None:
    import pyarrow.parquet as pq

    from modpo_pipe.evaluate import weight_grid
    from modpo_pipe.schema import read_metadata, reward_names_of
    from modpo_pipe.train import train

    read_metadata(scored[0])  # a missing or unreadable file: one line (train checks the rest)
    names = reward_names_of(pq.read_schema(scored[0]))  # column order: the order rewards were given in
    if len(names) < 2 and not vectors:
        raise ModpoError(f"{scored[0]}: holds one reward ({', '.join(names)}); a sweep trades rewards off, so it needs "
                         "two or more (one reward: modpo-pipe train)")
    grid_vectors = ([cfg.coerce(v, dict[str, float], "--vector") for v in vectors] if vectors
                    else weight_grid(names, grid))
    root = api.output_path(settings.train.out, "directory")
    labels: dict[str, dict[str, float]] = {}
    for weights in grid_vectors:
        label = "w-" + "-".join(f"{k}{v:.2f}" for k, v in weights.items())
        if label in labels:
            raise ModpoError(f"--vector {weights} and {labels[label]} would both train into {root / label}; give "
                             "vectors that differ in their first two decimals")
        labels[label] = weights
    for label, weights in labels.items():
        # Each policy's own directory is its out: what its modpo_pipe.json and model card record.
        train_settings = dataclasses.replace(settings.train, weights=weights, out=str(root / label))
        report = train(dataclasses.replace(settings, train=train_settings), list(scored), root / label)
        if report.main_process:  # under `accelerate launch`, one summary
            print_summary(f"{'nothing to do: already trained' if report.up_to_date else 'wrote'} {report.out}/final",
                           {"weights": weights, "last loss": report.last_loss})


@stage_command(
    "eval", ["generate", "score", "model"],
    inspect.Parameter("prompts", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                      default=typer.Argument(..., help="Held-out prompts (JSONL, Parquet or datasets dir).")),
    help="Sample from policies on held-out prompts, score them, estimate KL to the reference -> eval.json.",
    extra=(
        extra_option("policies", Optional[list[str]], None, "--policies",
                     "Policies to evaluate: PATH (a directory; its name is the label) or LABEL=PATH (a directory "
                     "or a hub id), repeatable. The reference is always included."),
        extra_option("samples_per_prompt", int, 1, "--samples-per-prompt", "Samples per prompt and policy."),
        extra_option("summary_out", Path, Path("eval.json"), "--summary-out", "Where to write the summaries.",
                     aliases=("--out",)),
    ),
    # eval's own --samples-per-prompt and --out (its summary) above; and no flags for settings of the stage
    # files eval does not write (a flag it would ignore is worse than none); eval refuses invalid rewards.
    skip=frozenset().union(*(fields_where(cfg.SECTIONS[s], s, eval_flag=False) for s in ("generate", "score"))),
)
def eval_command(settings: cfg.Settings, prompts: Path, policies: list[str] | None, samples_per_prompt: int,
                 summary_out: Path) -> None:
    from modpo_pipe import storage
    from modpo_pipe.evaluate import evaluate, format_table, write_summaries

    ref = settings.score.ref or settings.generate.policy
    if not ref:
        raise ModpoError("eval needs a reference: --ref or [generate].policy")
    # Checked before the evaluation's minutes, not after them.
    storage.refuse_overwriting_input(summary_out, prompts)
    if summary_out.is_dir() or (summary_out.parent.exists() and not summary_out.parent.is_dir()):
        raise ModpoError(f"--out {summary_out}: not a path a summary file can be written to")
    labelled = policy_specs(policies or [])
    summaries = evaluate(settings, prompts, labelled, ref, samples_per_prompt)
    write_summaries(summaries, summary_out)
    from modpo_pipe.evaluate import format_hypervolumes, read_summaries

    entries = read_summaries([summary_out])
    typer.echo(format_table(entries))
    if len(entries[0]["rewards"]) > 1 and len(entries) > 1:
        typer.echo(format_hypervolumes(entries))
    typer.echo(f"wrote {summary_out}")


@app.command("front")
def front_command(
    summaries: list[Path] = typer.Argument(..., help="eval.json files written by `modpo-pipe eval`."),
    x: str = typer.Option("", "--x", help="Reward on the x axis (default: the first other than --y)."),
    y: str = typer.Option("", "--y", help="Reward on the y axis (default: the first other than --x)."),
    out: Path = typer.Option(Path("front"), "--out", help="Output path: writes OUT.png and OUT.svg."),
) -> None:
    """Plot reward vs reward, one labelled point per policy, each family (MODPO, rewarded soups) joined as its own
    line; print the table and each family's hypervolume minus the reference's (from the rewards' declared
    bounds, else the worst means), then the area that beats the reference on every reward."""
    from modpo_pipe.evaluate import format_hypervolumes, format_table, plot_front, read_summaries

    with user_errors():
        entries = read_summaries(summaries)
        names = list(entries[0]["rewards"])
        x = x or next((name for name in names if name != y), y)
        y = y or next((name for name in names if name != x), "")
        if not y:
            raise ModpoError(f"a front needs two rewards; the summaries have {names}")
        written = plot_front(entries, x, y, out)
    typer.echo(format_table(entries))
    if len(entries) > 1:
        typer.echo(format_hypervolumes(entries, [x, y]))
    typer.echo("wrote " + ", ".join(map(str, written)))


@app.command("soup")
def soup_command(
    a: Path = typer.Argument(..., help="Policy A (full weights; a LoRA run's merged/ directory): lambda = 0."),
    b: Path = typer.Argument(..., help="Policy B, same architecture and tokenizer: lambda = 1."),
    lambdas: str = typer.Option("0,0.25,0.5,0.75,1", "--lambdas", help="Comma-separated lambdas in [0, 1]."),
    out: Path = typer.Option(Path("soups"), "--out", help="Writes OUT/soup-LAMBDA/ per lambda."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Load the tokenizers' own code."),
) -> None:
    """Rewarded soups: the policies (1 - lambda) A + lambda B, weight by weight, to evaluate (`eval --policies`)
    and plot (`front`) beside the MODPO front."""
    from modpo_pipe.soup import soup

    with user_errors():
        try:
            values = [float(v) for v in lambdas.split(",") if v.strip()]
        except ValueError:
            raise ModpoError(f"--lambdas: expected comma-separated numbers, got {lambdas!r}") from None
        written = soup(a, b, values, out, trust_remote_code)
    typer.echo("wrote " + ", ".join(map(str, written)))


def _demo_size(name: str, flag: str, text: str) -> Any:
    """A demo size flag: left out, the demo's own size (or --quick's); given, that number (check_size refuses one
    below what the demo can run: 0 once meant the default, and ran a demo of another size than asked for)."""
    from modpo_pipe.demo import QUICK, DemoSize

    return typer.Option(None, flag, show_default=False,
                        help=f"{text} (default {getattr(DemoSize(), name)}; --quick: {getattr(QUICK, name)}).")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for every file the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="A smaller run (fewer prompts and steps) for a smoke check."),
    train_prompts: Optional[int] = _demo_size("train_prompts", "--train-prompts",
                                              "Training prompts, split evenly over the rounds"),
    eval_prompts: Optional[int] = _demo_size("eval_prompts", "--eval-prompts", "Held-out prompts"),
    eval_samples: Optional[int] = _demo_size("eval_samples", "--eval-samples",
                                             "Replies per held-out prompt and policy"),
    rounds: Optional[int] = _demo_size("rounds", "--rounds",
                                       "Rounds; round k samples with the policy round k-1 trained"),
    train_steps: Optional[int] = _demo_size(
        "train_steps", "--train-steps", "Optimizer steps per policy over all rounds; the batch is a round's prompts / "
        "its steps"),
    samples_per_prompt: Optional[int] = _demo_size(
        "samples_per_prompt", "--samples-per-prompt", "Responses per training prompt, one group; all pairs train"),
    seed: int = typer.Option(0, "--seed", help="Seed of sampling and training."),
) -> None:
    """The whole method on a real model, offline, in rounds: SmolLM2-135M-Instruct, positivity vs concision,
    three weight vectors, evaluated on held-out prompts, with the front plotted."""
    import dataclasses

    from modpo_pipe.demo import QUICK, DemoSize, run_demo

    size = QUICK if quick else DemoSize()
    chosen = {"train_prompts": train_prompts, "eval_prompts": eval_prompts, "eval_samples": eval_samples,
              "rounds": rounds, "train_steps": train_steps, "samples_per_prompt": samples_per_prompt}
    with user_errors():
        run_demo(out, dataclasses.replace(size, seed=seed, **{k: v for k, v in chosen.items() if v is not None}))


@app.command("init")
def init_command(
    path: Path = typer.Argument(Path(cfg.DEFAULT_CONFIG_NAME), help="Where to write the settings file."),
    policy: str = typer.Option("", "--policy", help="Policy to write into [generate].policy."),
    reward: list[str] = typer.Option([], "--reward", help="NAME=SPEC reward entries to write (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented modpo.toml with every setting and its default."""
    from modpo_pipe import storage
    from modpo_pipe.schema import check_reward_name

    with user_errors():
        if path.is_dir():
            raise ModpoError(f"{path} is a directory; give the settings file's path (e.g. {path / 'modpo.toml'})")
        if path.exists() and not force:
            raise ModpoError(f"{path} exists; pass --force to overwrite")
        if not path.parent.is_dir():
            raise ModpoError(f"{path}: no directory {path.parent}")
        rewards = cfg.coerce(reward, dict[str, str], "--reward") if reward else {}
        for name in rewards:
            check_reward_name(name)
        # Written beside the file and checked to load before it replaces anything: a file init could not write
        # leaves the user's old one as it was.
        tmp = storage.unique_temp_path(path)
        try:
            tmp.write_text(cfg.render_template(policy=policy, rewards=rewards), encoding="utf-8")
            cfg.load_settings(tmp)  # what init writes must load
            storage.fsync_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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


# --- iterative rounds: `run` (modpo_pipe/rounds/) and `status` (modpo_pipe/status.py) ---

# Settings `run` sets per round itself, so they get no flag there.
_RUN_MANAGED = api.RUN_MANAGED


def _run_setting_parameters() -> list[inspect.Parameter]:
    """[run] and [model] flags as in every command; [generate], [score] and [train] flags prefixed with their
    section (--generate-seed, --score-reward, --train-beta), since those sections share field names."""
    from modpo_pipe.rounds import STAGE_TABLE  # light: no torch

    sections = [stage.section for stage in STAGE_TABLE.values()]
    return setting_parameters(["run", "model"]) + setting_parameters(sections, prefixed=True, skip=_RUN_MANAGED)


_WORKDIR_PARAM = inspect.Parameter(
    "workdir", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
    default=typer.Option(..., "--workdir", "-w", help="The run directory (round-000/, state.json, .lock)."),
)
_RUN_CONFIG_PARAM = inspect.Parameter(
    "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
    default=typer.Option(None, "--config", "-c", help="Settings file (default: WORKDIR/modpo.toml)."),
)


def _run_settings(workdir: Path, config: Path | None, kwargs: dict[str, Any]) -> cfg.Settings:
    overrides: dict[str, dict[str, Any]] = {s: {} for s in cfg.SECTIONS}
    for key, value in kwargs.items():
        section, field_name = key.split("__", 1)
        overrides[section][field_name] = value
    if workdir.exists() and not workdir.is_dir():
        raise ModpoError(f"--workdir {workdir} is a file, not a run directory; give the run's directory")
    if config is None:
        config = workdir / cfg.DEFAULT_CONFIG_NAME
        if not config.is_file():
            raise ModpoError(f"no {config}: write one with `modpo-pipe init {config}`, or pass --config")
    return cfg.load_settings(config, overrides)


@contextmanager
def _run_exit_codes() -> Iterator[None]:
    """rounds.EXIT_*: 75 when another invocation holds the lock, 78 for a refused settings change, 1 else."""
    from modpo_pipe import rounds, runstate

    try:
        yield
    except runstate.LockHeld as e:
        typer.secho(f"locked: {e}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(rounds.EXIT_LOCKED) from None
    except rounds.ConfigChanged as e:
        error_line(e)
        raise typer.Exit(rounds.EXIT_CONFIG_CHANGED) from None
    except ModpoError as e:
        error_line(e)
        raise typer.Exit(EXIT_FAILURE) from None
    except OSError as e:
        environment_exit(e)


def _register_run_commands() -> None:
    from modpo_pipe import rounds  # light: no torch
    from modpo_pipe import status as status_view

    def run_command(**kwargs: Any) -> None:
        workdir, config = kwargs.pop("workdir"), kwargs.pop("config")
        max_stages, until = kwargs.pop("max_stages"), kwargs.pop("until")
        allow, shard, retry = kwargs.pop("allow_config_change"), kwargs.pop("shard"), kwargs.pop("retry")
        with _run_exit_codes():
            settings = _run_settings(workdir, config, kwargs)
            if shard:
                own = config is None and all(value is None for value in kwargs.values())
                api.run_shard(workdir, shard, settings=settings, own_settings=own)
                return
            api.run(workdir, settings=settings, max_stages=max_stages, until=until, allow_config_change=allow,
                    retry=retry)

    run_params = [
        _WORKDIR_PARAM, _RUN_CONFIG_PARAM,
        inspect.Parameter("max_stages", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
                          default=typer.Option(None, "--max-stages", help="Run at most N stages, then exit.")),
        inspect.Parameter("until", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("end", "--until",
                                               help="end: every due round; round: finish the current round.")),
        inspect.Parameter("allow_config_change", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--allow-config-change",
                                               help="Redo finished stages whose settings changed (remembered: later "
                                                    "invocations redo them without the flag).")),
        inspect.Parameter("retry", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--retry",
                                               help="Run a stage that failed [run].max_failures times in a row (and "
                                                    "is no longer tried) once more.")),
        inspect.Parameter("shard", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--shard", help=(
                              "I/N (0-based; N = [run].shards): be a shard worker: compute shard I of the generate "
                              "or score stage that the plain `run` opened, then exit. Start one per shard, from any "
                              "batch system; the plain `run` merges them."))),
        *_run_setting_parameters(),
    ]
    run_help = (f"Advance the run directory by what is due: {', '.join(rounds.STAGES)} for round k, then round k+1, "
                f"until the configured number of rounds (--rounds). Safe to start from cron. "
                f"Exit {rounds.EXIT_OK}: advanced or nothing to do; "
                f"{rounds.EXIT_LOCKED}: another invocation holds the lock (nothing touched); "
                f"{rounds.EXIT_CONFIG_CHANGED}: a settings change would redo finished stages; "
                f"{rounds.EXIT_FAILURE}: a failure (a stage that failed [run].max_failures times in a row: on every "
                f"invocation, until --retry).")
    run_command.__signature__ = inspect.Signature(run_params)  # type: ignore[attr-defined]
    run_command.__annotations__ = {p.name: p.annotation for p in run_params}
    app.command("run", help=run_help)(run_command)

    def status_command(**kwargs: Any) -> None:
        workdir, config, as_json = kwargs.pop("workdir"), kwargs.pop("config"), kwargs.pop("as_json")
        with _run_exit_codes():
            settings = _run_settings(workdir, config, kwargs)
            report = status_view.status(workdir, settings)
        typer.echo(json.dumps(report, indent=2) if as_json else status_view.format_status(report))

    status_params = [
        _WORKDIR_PARAM, _RUN_CONFIG_PARAM,
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--json", help="Print one JSON object instead of a table.")),
        *_run_setting_parameters(),
    ]
    status_command.__signature__ = inspect.Signature(status_params)  # type: ignore[attr-defined]
    status_command.__annotations__ = {p.name: p.annotation for p in status_params}
    app.command("status", help="Per round and stage: done / pending / failed, rows, wall time, mean rewards, "
                "loss and kl_k2 (the last epoch's mean KL(pi_ref || pi) estimate). Read-only; give it the flags `run` "
                "gets.")(status_command)


_register_run_commands()


def main() -> None:
    from modpo_pipe import supervise

    if supervise.supervised():  # the work in a child process, whose every ending this one reports (supervise.py)
        supervise.fork()
    code: int | str | None = 0
    try:
        app()  # standalone mode: ends in SystemExit
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        code = e.code
    except BaseException:  # a bug: its traceback follows, and the command has ended (exit 1)
        supervise.report(1)
        raise
    supervise.report(code)
    end_processes(code)
    sys.exit(code)


def end_processes(code: int | str | None) -> None:
    """A process of a multi-process run (`accelerate launch`, or --num-processes) ends here, with the command's
    exit code: close the process group, flush, and leave without finalizing the interpreter. Why: gloo's
    worker threads free a collective's tensors after the collective has returned; freeing one made in Python
    takes the GIL, and a worker that asks for it while the interpreter finalizes aborts the process (SIGABRT,
    "terminate called without an active exception") after all the work is done: 4 of 41 two-process trainings
    on 2 CPU cores, and a CI run. Nothing is left for finalization: outputs are written atomically and
    trackers finished before the command returns. One process (no process group): a no-op."""
    if "torch.distributed" not in sys.modules or not isinstance(code, (int, type(None))):
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    import logging

    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
