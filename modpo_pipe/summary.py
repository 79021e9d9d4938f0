"""`modpo-pipe inspect`: what a stage file holds, computed from the file alone."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from modpo_pipe import schema


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values)}


def summarize(path: Path) -> dict[str, Any]:
    meta = schema.read_metadata(Path(path))
    table, meta = schema.read_table(Path(path), meta.get("stage", "?"))
    summary: dict[str, Any] = {"stage": meta["stage"], "schema_version": meta["schema_version"],
                               "rows": table.num_rows}
    lengths = [len(ids) for col in ("response_ids_1", "response_ids_2") for ids in table.column(col).to_pylist()]
    reasons = table.column("finish_reason_1").to_pylist() + table.column("finish_reason_2").to_pylist()
    summary["response_tokens"] = _stats(lengths)
    summary["finish_reason"] = {r: reasons.count(r) for r in schema.FINISH_REASONS}
    identical = sum(a == b for a, b in zip(table.column("response_ids_1").to_pylist(),
                                          table.column("response_ids_2").to_pylist()))
    summary["identical_pairs"] = identical
    if meta["stage"] == "scored":
        summary["rewards"] = {}
        for name in schema.reward_names_of(table.schema):
            col_1, col_2 = schema.reward_columns(name)
            r1, r2 = table.column(col_1).to_pylist(), table.column(col_2).to_pylist()
            summary["rewards"][name] = {**_stats(r1 + r2),
                                        "mean_abs_margin": statistics.fmean(abs(a - b) for a, b in zip(r1, r2))}
        ref = table.column("ref_logp_1").to_pylist() + table.column("ref_logp_2").to_pylist()
        summary["ref_logp"] = _stats(ref)
        gen = table.column("gen_logp_1").to_pylist() + table.column("gen_logp_2").to_pylist()
        pairs = [(g, r) for g, r in zip(gen, ref) if g is not None]
        if pairs:
            # In a round whose sampler is the reference, this measures sampler/trainer numerical drift.
            gaps = [abs(g - r) for g, r in pairs]
            summary["gen_vs_ref_logp"] = {"responses": len(pairs), "mean_abs_gap": statistics.fmean(gaps),
                                          "max_abs_gap": max(gaps)}
    summary["metadata"] = meta
    return summary
