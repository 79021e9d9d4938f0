"""`modpo-pipe inspect`: what a stage file holds, computed from the file alone."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from modpo_pipe import schema
from modpo_pipe.errors import ModpoError


def _stats(values: list[float]) -> dict[str, float | None]:
    """Mean, std, min and max of the finite values; NaN and infinities (which train refuses, and which inspect is
    there to find) counted apart."""
    finite = [v for v in values if math.isfinite(v)]
    stats: dict[str, float | None] = {"mean": None, "std": None, "min": None, "max": None}
    if finite:  # (none: a shard whose groups all went to other shards or were dropped)
        stats = {"mean": statistics.fmean(finite), "std": statistics.pstdev(finite), "min": min(finite),
                 "max": max(finite)}
    if len(finite) < len(values):
        stats["non_finite"] = len(values) - len(finite)
    return stats


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def summarize(path: Path) -> dict[str, Any]:
    meta = schema.read_metadata(Path(path))
    stage = meta.get("stage")
    if stage not in schema.STAGES:
        raise ModpoError(f"{path}: its metadata names stage {stage!r}; inspect reads "
                         f"{' and '.join(schema.STAGES)} files")
    table, meta = schema.read_table(Path(path), stage)
    summary: dict[str, Any] = {"stage": meta["stage"], "schema_version": meta["schema_version"],
                               "rows": table.num_rows}
    groups = table.column("response_ids").to_pylist()
    summary["responses_per_group"] = _stats([float(len(ids)) for ids in groups])
    summary["response_tokens"] = _stats([len(ids) for group in groups for ids in group])
    reasons = [r for group in table.column("finish_reasons").to_pylist() for r in group]
    summary["finish_reason"] = {r: reasons.count(r) for r in schema.FINISH_REASONS}
    # Pairs of identical responses give no signal; "all" pairing counts every two responses of a group.
    summary["identical_pairs"] = sum(group[i] == group[j] for group in groups
                                     for i in range(len(group)) for j in range(i + 1, len(group)))
    if meta["stage"] == "scored":
        summary["rewards"] = {}
        for name in schema.reward_names_of(table.schema):
            values = table.column(schema.reward_column(name)).to_pylist()
            margins = [abs(g[i] - g[j]) for g in values for i in range(len(g)) for j in range(i + 1, len(g))]
            summary["rewards"][name] = {**_stats([v for g in values for v in g]),
                                        "mean_abs_margin": _mean(margins)}
        ref = [v for g in table.column(schema.REF_COLUMN[0]).to_pylist() for v in g]
        summary["ref_logp"] = _stats(ref)
        gen = [v for g in table.column("gen_logps").to_pylist() for v in g]
        pairs = [(g, r) for g, r in zip(gen, ref) if g is not None]
        if pairs:
            # In a round whose sampler is the reference, this measures sampler/trainer numerical drift.
            gaps = [abs(g - r) for g, r in pairs if math.isfinite(g - r)]
            summary["gen_vs_ref_logp"] = {"responses": len(gaps), "mean_abs_gap": _mean(gaps),
                                          "max_abs_gap": max(gaps, default=None)}
    summary["metadata"] = meta
    return summary
