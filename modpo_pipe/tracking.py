"""Experiment trackers (TensorBoard, Weights & Biases, MLflow, Trackio) through accelerate's tracker API.

`metrics.jsonl` stays the source of truth: trackers get a copy of every metrics line, and the settings as
hyperparameters. The default is `none`: a tool started from cron should not begin writing tracker files or
making network calls (wandb, a Trackio Space) that nobody asked for; `--report-to` turns them on.

`train` logs through its own `Accelerator(log_with=...)`. `run` logs every round of a run directory to one
tracker run (`RunTracker`): each round's reward means and its training metrics on one step axis (optimizer
steps counted over all rounds), so that a cron run reads as one curve. Every invocation of `run` reopens the
same tracker run: TensorBoard by its directory, wandb and Trackio by a name/id derived from the run directory,
MLflow by the run id saved in RUN/trackers.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from modpo_pipe import storage
from modpo_pipe.errors import ModpoError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
CHOICES = ("none", *TRACKERS, "all")
PROJECT = "modpo-pipe"


def parse_report_to(value: str) -> list[str]:
    """Tracker names from `none`, `all`, a name or comma-separated names; refuses one that is not installed."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise ModpoError(f"--report-to: unknown tracker {unknown[0]!r}; choose from {', '.join(CHOICES)}")
    if "none" in names:
        if len(names) > 1:
            raise ModpoError("--report-to: 'none' cannot be combined with trackers")
        return []
    installed = [n for n in TRACKERS if is_installed(n)]
    if "all" in names:
        if not installed:
            raise ModpoError(f"--report-to all: none of {', '.join(TRACKERS)} is installed")
        return installed
    missing = [n for n in names if n not in installed]
    if missing:
        raise ModpoError(f"--report-to {missing[0]}: the {missing[0]} package is not installed "
                         f"(pip install {missing[0]})")
    return list(dict.fromkeys(names))


def is_installed(name: str) -> bool:
    from accelerate import utils

    return bool(getattr(utils, f"is_{name}_available")())


def hyperparameters(sections: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Settings dataclasses flattened to `section.key` scalars (lists joined, dicts one key each), the types
    every tracker accepts as hyperparameters."""
    flat: dict[str, bool | int | float | str] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}.{k}", v)
        elif isinstance(value, (list, tuple)):
            flat[key] = ",".join(map(str, value))
        elif value is None:
            flat[key] = ""
        elif isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)

    for name, section in sections.items():
        put(name, dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section)
    return flat


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """The numbers of a metrics line (None, text and the step counter left out)."""
    return {f"{prefix}{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def tracker_kwargs(names: list[str], run_name: str, work_dir: Path, resume_id: str,
                   purge_step: int | None = None, mlflow_run_id: str | None = None) -> dict[str, dict[str, Any]]:
    """accelerate's init_kwargs: one name for the run, and the same tracker run again when the same work
    (`resume_id`) is continued. TensorBoard continues by directory; `purge_step` hides the steps a killed run
    logged past the state it resumes from."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and purge_step:
        kwargs["tensorboard"] = {"purge_step": purge_step}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name, "id": resume_id, "resume": "allow", "dir": str(work_dir)}
    if "trackio" in names:
        kwargs["trackio"] = {"name": f"{run_name}-{resume_id[:8]}", "resume": "allow"}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": run_name, **({"run_id": mlflow_run_id} if mlflow_run_id else {})}
    return kwargs


def resume_id(*parts: str) -> str:
    """A tracker run id (wandb: lowercase letters and digits) that is the same whenever `parts` are."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def finish(trackers: list[Any]) -> None:
    """End every tracker's run (flushes TensorBoard's writer). Not `Accelerator.end_training`, which would
    also tear down the process group the caller still uses."""
    for tracker in trackers:
        tracker.finish()


class RunTracker:
    """`run`'s one tracker run for all rounds of a run directory, started on first use (an invocation with
    nothing to do writes nothing). Steps: optimizer steps summed over rounds; round k's reward means are
    logged at the step its training starts from."""

    def __init__(self, run_dir: Path, report_to: str, settings_sections: dict[str, Any], device_setting: str):
        self.names = parse_report_to(report_to)
        self.run_dir = run_dir
        self.sections = settings_sections
        self.device_setting = device_setting
        self.trackers: list[Any] = []

    def _start(self) -> None:
        if self.trackers or not self.names:
            return
        import torch
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        # The process state `train` would make (its rule, train.make_accelerator), so the two agree later.
        cpu = self.device_setting == "cpu" or (self.device_setting == "auto" and not torch.cuda.is_available())
        PartialState(cpu=cpu)
        ids_path = self.run_dir / "trackers.json"
        saved = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        kwargs = tracker_kwargs(self.names, self.run_dir.name, self.run_dir,
                                resume_id(str(self.run_dir.resolve())), mlflow_run_id=saved.get("mlflow_run_id"))
        logging_dir = str(self.run_dir / "runs")
        for name in self.names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            args = (PROJECT, logging_dir) if cls.requires_logging_directory else (PROJECT,)
            tracker = cls(*args, **kwargs.get(name, {}))
            tracker.start()
            tracker.store_init_configuration(hyperparameters(self.sections))
            self.trackers.append(tracker)
            if name == "mlflow" and "mlflow_run_id" not in saved:
                saved["mlflow_run_id"] = tracker.active_run.info.run_id
                storage.write_atomic(ids_path, json.dumps(saved))

    def log(self, values: dict[str, float | int], step: int) -> None:
        if not self.names:
            return
        self._start()
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def round_rewards(self, k: int, reward_means: dict[str, float], step: int) -> None:
        self.log({"round": k, **{f"round/reward_mean/{n}": v for n, v in reward_means.items()
                                 if isinstance(v, (int, float)) and math.isfinite(v)}}, step)

    def round_training(self, metrics_path: Path, step_offset: int) -> None:
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                self.log(scalars(record, "train/"), step_offset + int(record["step"]))

    def close(self) -> None:
        finish(self.trackers)
        self.trackers = []
