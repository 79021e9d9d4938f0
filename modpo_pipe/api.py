"""The Python API: the commands' stages as functions, for notebooks and workflow engines.

    from modpo_pipe import api

    pairs = api.generate(prompts, "pairs.parquet", policy="path/to/policy", samples_per_prompt=4)
    scored = api.score(pairs.out, "scored.parquet", rewards={"helpful": "path/to/rm", "short": "py:fns.py:short"})
    trained = api.train(scored.out, "checkpoints", beta=0.1, weights={"helpful": 0.7, "short": 0.3})
    rounds = api.run("runs/a", prompts=prompts, rounds=3, generate={"policy": "path/to/policy"}, ...)

Each function takes the settings its command takes, and returns the report its stage returns (the dataclasses
GenerateReport, ScoreReport, TrainReport, rounds.AdvanceReport). Settings, as on the command line:
  - `config`: a modpo.toml; left out, ./modpo.toml when there is one (as the commands read it), for `run` the
    run directory's modpo.toml when there is one;
  - or `settings`: a Settings (api.settings(...), or config.load_settings), used instead of any file;
  - then keyword settings, named as the keys of the sections the command reads ([generate] and [model] for
    generate: `policy=`, `samples_per_prompt=`, `dtype=`, ...; [score] and [model] for score; [train] and [model]
    for train), with Python values (a dict for a table, a list, a Path). `out` is the section's `out` key.
A keyword that is no key of those sections, or a value of the wrong type, is one ModpoError naming it, as is any
bad input a command would refuse. Prompts may be a path (as the commands take), a list of dicts or a
datasets.Dataset; the last two are written next to the output (OUT's name with .prompts.jsonl / .prompts.parquet)
and read from there, so the pairs file's metadata names a file that holds them. Their fields and ids follow the
rules of prompt files (docs/guide.md).

Why `api.generate`, not `modpo_pipe.generate`: modpo_pipe.generate, .score and .train are the stage modules, and a
package attribute holds one thing: importing the submodule (which every call does) would rebind the package's
name from the function to the module.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modpo_pipe import config as cfg
from modpo_pipe import storage
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError
from modpo_pipe.roles import fields_where

if TYPE_CHECKING:
    from modpo_pipe.generate import GenerateReport
    from modpo_pipe.rounds import AdvanceReport
    from modpo_pipe.score import ScoreReport
    from modpo_pipe.train import TrainReport

PathLike = str | os.PathLike
Prompts = PathLike | Sequence[dict] | Any  # Any: a datasets.Dataset
Shard = str | tuple[int, int] | None

# The sections each command reads; its keyword settings are their keys.
STAGE_SECTIONS = {"generate": ("generate", "model"), "score": ("score", "model"), "train": ("train", "model")}
# Settings `run` sets per round itself (each round's outputs, the policy it trains, the statistics it z-scores
# with): not settings of a run, so neither flags nor keywords.
RUN_MANAGED = frozenset().union(*(fields_where(cfg.SECTIONS[s], s, run_sets=True) for s in cfg.SECTIONS))


def settings(config: PathLike | None = None, *, model: dict[str, Any] | None = None,
             generate: dict[str, Any] | None = None, score: dict[str, Any] | None = None,
             train: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> Settings:
    """Settings as modpo.toml holds them: `config` (a file; left out, ./modpo.toml when there is one), then one dict
    per section overriding its keys: settings(generate={"policy": "path"}, train={"beta": 0.2})."""
    sections = {"model": model, "generate": generate, "score": score, "train": train, "run": run}
    overrides = {name: _section_keywords("settings()", name, given or {}) for name, given in sections.items()}
    return cfg.load_settings(_path(config), overrides, source="keywords of settings()")


def generate(prompts: Prompts, out: PathLike | None = None, *, settings: Settings | None = None,
             config: PathLike | None = None, shard: Shard = None, **keywords: Any) -> GenerateReport:
    """Sample [generate].samples_per_prompt responses per prompt -> OUT (pairs.parquet), as `modpo-pipe generate`.
    shard: "I/N" or (I, N), that shard only (joined by `modpo-pipe merge`)."""
    from modpo_pipe.generate import run_generate

    chosen = _stage_settings("generate", settings, config, out, keywords)
    target = output_path(chosen.generate.out, "file")
    source = prompts_path(prompts, target.with_suffix(""))
    return run_generate(chosen, source, target, **_shard(shard))


def score(pairs: PathLike, out: PathLike | None = None, *, settings: Settings | None = None,
          config: PathLike | None = None, shard: Shard = None, **keywords: Any) -> ScoreReport:
    """Every reward for every response, and the reference's log-probs -> OUT (scored.parquet), as
    `modpo-pipe score`."""
    from modpo_pipe.score import run_score

    chosen = _stage_settings("score", settings, config, out, keywords)
    return run_score(chosen, Path(pairs), output_path(chosen.score.out, "file"), **_shard(shard))


def train(scored: PathLike | Sequence[PathLike], out: PathLike | None = None, *, settings: Settings | None = None,
          config: PathLike | None = None, **keywords: Any) -> TrainReport:
    """Train the policy on one or more scored files -> OUT/final, as `modpo-pipe train`, in this process (several
    processes: `modpo-pipe train --num-processes N`)."""
    from modpo_pipe.train import train as train_stage

    files = [Path(scored)] if isinstance(scored, (str, os.PathLike)) else [Path(f) for f in scored]
    chosen = _stage_settings("train", settings, config, out, keywords)
    return train_stage(chosen, files, output_path(chosen.train.out, "directory"))


def run(workdir: PathLike, *, settings: Settings | None = None, config: PathLike | None = None,
        prompts: Prompts | None = None, generate: dict[str, Any] | None = None, score: dict[str, Any] | None = None,
        train: dict[str, Any] | None = None, max_stages: int | None = None, until: str = "end",
        allow_config_change: bool = False, retry: bool = False, **keywords: Any) -> AdvanceReport:
    """Advance the run directory by what is due, as `modpo-pipe run -w WORKDIR`: generate, score, train for round
    k, then round k+1. Keywords: [run] and [model] keys (`rounds=3`, `prompts=`: a path, a list of dicts or a
    datasets.Dataset, written to WORKDIR/run.prompts.jsonl / .parquet), and one dict each for [generate], [score]
    and [train] (`train={"beta": 0.2}`; each round's outputs, [train].policy and reward_stats are the run's).
    Raises runstate.LockHeld while another invocation works there, rounds.ConfigChanged for settings that would
    redo finished stages (unless allow_config_change), else ModpoError."""
    from modpo_pipe import rounds

    directory = _run_dir(workdir)
    in_python = prompts is not None and not isinstance(prompts, (str, os.PathLike))
    if not in_python:  # a path, read as [run].prompts is (a Hub dataset id too)
        keywords = {**keywords, "prompts": prompts}
    chosen = _run_settings(directory, settings, config, keywords, generate, score, train)
    if in_python:  # written once the settings are known to be good
        written = prompts_path(prompts, directory / "run").absolute()
        chosen = dataclasses.replace(chosen, run=dataclasses.replace(chosen.run, prompts=str(written)))
    return rounds.advance(directory, chosen, max_stages=max_stages, until=until,
                          allow_config_change=allow_config_change, retry=retry)


def run_shard(workdir: PathLike, shard: Shard, *, settings: Settings | None = None, config: PathLike | None = None,
              generate: dict[str, Any] | None = None, score: dict[str, Any] | None = None,
              train: dict[str, Any] | None = None, own_settings: bool | None = None, **keywords: Any) -> str | None:
    """Be a shard worker of the run, as `modpo-pipe run -w WORKDIR --shard I/N`: compute shard I of the generate or
    score stage the coordinating run opened. Returns that stage's name, or None when none waits for shards.
    own_settings (default: no settings, config nor keywords given): the settings are the run's modpo.toml alone, so
    a stage opened with others is left to the coordinating run to reopen."""
    from modpo_pipe import rounds

    directory = _run_dir(workdir)
    if own_settings is None:
        own_settings = settings is None and config is None and not keywords and not (generate or score or train)
    chosen = _run_settings(directory, settings, config, keywords, generate, score, train)
    return rounds.work_shard(directory, chosen, _shard(shard)["shard"], own_settings=own_settings)


# --- settings from keywords ---


def _stage_settings(command: str, base: Settings | None, config: PathLike | None, out: PathLike | None,
                    keywords: dict[str, Any]) -> Settings:
    """`base`, else the config file; then the keywords, each a key of one of the command's sections."""
    if out is not None:
        keywords = {**keywords, "out": out}
    caller = f"{command}()"
    overrides: dict[str, dict[str, Any]] = {name: {} for name in cfg.SECTIONS}
    for key, value in keywords.items():
        section = next((s for s in STAGE_SECTIONS[command] if key in _keys(s)), None)
        if section is None:
            raise ModpoError(_unknown_keyword(caller, key, STAGE_SECTIONS[command]))
        overrides[section][key] = _plain(value)
    return _load(caller, base, config, overrides)


def _run_settings(directory: Path, base: Settings | None, config: PathLike | None, keywords: dict[str, Any],
                  generate: dict[str, Any] | None, score: dict[str, Any] | None,
                  train: dict[str, Any] | None) -> Settings:
    """A run's settings: `base`, else `config`, else WORKDIR/modpo.toml when there is one (never ./modpo.toml: the
    run's own file is the one `modpo-pipe run` reads); then the keywords."""
    caller = "run()"
    overrides: dict[str, dict[str, Any]] = {name: {} for name in cfg.SECTIONS}
    for key, value in keywords.items():
        section = next((s for s in ("run", "model") if key in _keys(s)), None)
        if section is None:
            raise ModpoError(_unknown_keyword(caller, key, ("run", "model"), dicts=("generate", "score", "train")))
        overrides[section][key] = _plain(value)
    for name, given in (("generate", generate), ("score", score), ("train", train)):
        managed = sorted(key for key in given or {} if (name, key) in RUN_MANAGED)
        if managed:
            raise ModpoError(f"{caller}: [{name}].{managed[0]} is set by the run for each round; leave it out")
        overrides[name] = _section_keywords(caller, name, given or {})
    if base is None and config is None:
        own = directory / cfg.DEFAULT_CONFIG_NAME
        base = None if own.is_file() else _defaults()
        config = own if own.is_file() else None
    return _load(caller, base, config, overrides)


def _load(caller: str, base: Settings | None, config: PathLike | None,
          overrides: dict[str, dict[str, Any]]) -> Settings:
    if base is not None and config is not None:
        raise ModpoError(f"{caller}: give settings= or config=, not both (a Settings holds its file's values)")
    if base is not None and not isinstance(base, Settings):
        raise ModpoError(f"{caller}: settings= must be a modpo_pipe.config.Settings (api.settings(...) makes one); "
                         f"got {type(base).__name__}")
    return cfg.load_settings(_path(config), overrides, base=base, source=f"keywords of {caller}")


def _section_keywords(caller: str, section: str, given: dict[str, Any]) -> dict[str, Any]:
    """One section's dict of keys, each checked to be a key of it."""
    if not isinstance(given, dict):
        raise ModpoError(f"{caller}: {section}= must be a dict of [{section}] keys; got {type(given).__name__}")
    for key in given:
        if key not in _keys(section):
            raise ModpoError(_unknown_keyword(caller, key, (section,), within=section))
    return {key: _plain(value) for key, value in given.items()}


def _keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg.SECTIONS[section])]


def _unknown_keyword(caller: str, key: str, sections: Sequence[str], dicts: Sequence[str] = (),
                     within: str | None = None) -> str:
    """One line: the keyword, what it may have meant, and where it belongs when another command reads it."""
    known = [k for s in sections for k in _keys(s)]
    where = f"{within}= key" if within else "keyword"
    message = f"{caller}: unknown {where} {key!r}"
    owners = [s for s in cfg.SECTIONS if s not in sections and key in _keys(s)]
    if owners:
        readers = f"; give it as {caller[:-2]}({owners[0]}={{{key!r}: ...}})" if owners[0] in dicts else ""
        return message + f": it is a key of [{owners[0]}], which {caller} does not read{readers}"
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return message + f" (did you mean {close[0]!r}?)"
    return message + f"; the keys it takes are those of {', '.join(f'[{s}]' for s in sections)} (docs/configuration.md)"


def _plain(value: Any) -> Any:
    """Python values as the settings' types take them: paths as strings, tuples as lists, inside tables too."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _defaults() -> Settings:
    return Settings(**{name: cls() for name, cls in cfg.SECTIONS.items()})


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def _run_dir(workdir: PathLike) -> Path:
    directory = Path(workdir)
    if directory.exists() and not directory.is_dir():
        raise ModpoError(f"run(): workdir {directory} is a file, not a run directory; give the run's directory")
    return directory


def _shard(shard: Shard) -> dict[str, tuple[int, int]]:
    """The stages' `shard` keyword: {} for none."""
    from modpo_pipe.shards import parse_shard

    if shard is None:
        return {}
    if isinstance(shard, str):
        return {"shard": parse_shard(shard)}
    return {"shard": parse_shard(f"{shard[0]}/{shard[1]}")}  # the same checks for a tuple


def output_path(setting: str, kind: str) -> Path:
    """An `out` setting as a path, refused now if the command could never write it there (after its minutes)."""
    path = Path(setting).resolve()
    storage.refuse_unwritable_output(path, kind)
    return path


# --- prompts given as Python objects ---


def prompts_path(prompts: Prompts, stem: Path) -> Path:
    """A file the stages read the prompts from: a path as it is; a list of dicts written as STEM.prompts.jsonl,
    a datasets.Dataset as STEM.prompts.parquet (next to the output, kept: the pairs file's metadata names it)."""
    if isinstance(prompts, (str, os.PathLike)):
        return Path(prompts)
    if _is_dataset(prompts):
        return _write_dataset(prompts, stem.with_name(stem.name + ".prompts.parquet"))
    if isinstance(prompts, (list, tuple)):
        return _write_jsonl(prompts, stem.with_name(stem.name + ".prompts.jsonl"))
    raise ModpoError(f"prompts must be a path, a list of dicts or a datasets.Dataset; got {type(prompts).__name__}")


def _is_dataset(value: Any) -> bool:
    if "datasets" not in sys.modules:  # nothing can be a Dataset before the package is imported
        return False
    import datasets

    if isinstance(value, datasets.DatasetDict):
        raise ModpoError(f"prompts: a DatasetDict of splits {list(value)}; give one split (dataset['train'])")
    return isinstance(value, datasets.Dataset)


def _write_jsonl(rows: Sequence[Any], path: Path) -> Path:
    """One JSON line per dict, in order: row i is the file's line i + 1, its id the row's id or row-NNNNNN."""
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ModpoError(f"prompts[{i}]: expected a dict with 'prompt' or 'messages', got {type(row).__name__}")
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        except (TypeError, ValueError) as e:
            raise ModpoError(f"prompts[{i}]: not JSON ({e})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))
    return path


def _write_dataset(dataset: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda tmp: dataset.to_parquet(str(tmp)))
    return path


def _replace(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary name of this process alone (shard workers may write the same prompts at once)."""
    tmp = storage.unique_temp_path(path)
    try:
        write(tmp)
        storage.fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
