"""The status view of a run directory: per round and stage, its status, rows, wall time and a headline; then the
mean rewards of every round. Read-only: takes no lock, writes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError
from modpo_pipe.rounds import STAGE_TABLE, Run
from modpo_pipe.runstate import MANIFEST_NAME, Manifest, lock_is_held, recorded_seconds, round_name


def status(run_dir: Path, settings: Settings) -> dict[str, Any]:
    """Per round and stage: status, rows, wall time and headline metrics; read-only, takes no lock."""
    run = Run(run_dir, settings, progress=False, fetch=False)
    if not (run.dir / MANIFEST_NAME).exists() and not run.dir.exists():
        raise ModpoError(f"{run.dir}: no such run directory")
    manifest = Manifest.load(run.dir)
    held = lock_is_held(run.dir)
    states = run.survey(manifest, lock_held_elsewhere=held)
    rows = []
    for s in states:
        record = s.record or {}
        summary = record.get("summary", {}) if record.get("status") == "done" else {}
        rows.append({"round": s.round, "stage": s.stage, "status": s.status, "reason": s.reason,
                     "failures": s.failures, "rows": summary.get("rows"), "seconds": record.get("seconds"),
                     "started": record.get("started"), "finished": record.get("finished"),
                     "summary": summary, "settings_changed": s.changed})
    due = next((s for s in states if not s.valid), None)
    rewards = {}
    for s in states:
        if s.stage == "score" and s.valid:  # a score due again describes samples that are being replaced
            rewards[s.round] = s.record["summary"]["reward_mean"]
    return {"run_dir": str(run.dir), "rounds": settings.run.rounds, "running": held,
            "max_failures": settings.run.max_failures,
            "done": sum(s.valid for s in states), "stages": len(states),
            "next": due.name if due else None, "config_changed": any(s.change_refused for s in states),
            "table": rows, "reward_mean_by_round": rewards}


def format_status(report: dict[str, Any]) -> str:
    lines = [f"{report['run_dir']}: {report['rounds']} rounds, {report['done']}/{report['stages']} stages done"
             + ("; an invocation is running now" if report["running"] else "")
             + (f"; next: {report['next']}" if report["next"] else "; finished")]
    lines.append(f"{'round':<10} {'stage':<9} {'status':<8} {'rows':>6} {'wall':>8}  headline")
    for row in report["table"]:
        seconds = recorded_seconds(row["seconds"])
        wall = f"{seconds:.1f}s" if seconds is not None else "-"
        rows = str(row["rows"]) if row["rows"] is not None else "-"
        if row["status"] != "done":
            text = row["reason"] + _failures_note(row, report["max_failures"])
        else:
            text = STAGE_TABLE[row["stage"]].status_text(row["summary"]) if row["summary"] else ""
        lines.append(f"{round_name(row['round']):<10} {row['stage']:<9} {row['status']:<8} {rows:>6} {wall:>8}  "
                     f"{text}")
    if report["reward_mean_by_round"]:
        names = sorted({n for means in report["reward_mean_by_round"].values() for n in means})
        lines.append("")
        lines.append("mean reward on each round's samples:")
        lines.append(f"{'round':<10} " + " ".join(f"{n:>12}" for n in names))
        for k, means in sorted(report["reward_mean_by_round"].items()):
            lines.append(f"{round_name(k):<10} " + " ".join(
                f"{means[n]:>12.4g}" if n in means else f"{'-':>12}" for n in names))
    if report["config_changed"]:
        lines.append("")
        lines.append("the settings differ from those finished stages ran with (see 'redo' rows); "
                     "`run` refuses unless --allow-config-change")
    return "\n".join(lines)


def _failures_note(row: dict[str, Any], limit: int) -> str:
    """How often a stage failed in a row, against [run].max_failures, and where its log is."""
    failures = row["failures"]
    if not failures:
        return ""
    log = f"{round_name(row['round'])}/{row['stage']}.log"
    if 0 < limit <= failures:
        return f" [failed {failures} times in a row: not tried again until `run --retry`; its log: {log}]"
    of = f" of the {limit} that stop `run` retrying it" if limit else ""
    return f" [failed {failures} time{'s' if failures > 1 else ''} in a row{of}; its log: {log}]"
