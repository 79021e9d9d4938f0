"""From the variants' raw results to the table: ratios of ours over the baseline (medians over repeats), the
targets they are held to, and the plain-text or Markdown form printed."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    stage: str
    metric: str
    ours: str
    baseline: str
    ratio: float | None  # from wall time (what the targets are about)
    target: str = ""
    met: bool | None = None
    cpu_ratio: float | None = None  # the same ratio from process CPU time: less distorted by other load


@dataclass
class Report:
    size: str
    machine: str
    repeats: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _get(runs: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[float]:
    return [r[key] for r in runs.get(name, []) if key in r]


def _ratio(runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str) -> float | None:
    """Median over repeats of a[key] / b[key], pairing the i-th run of each (ratios within one repeat)."""
    xs, ys = _get(runs, a, key), _get(runs, b, key)
    return _median([x / y for x, y in zip(xs, ys) if y])


def fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if unit == "GB":
        return f"{value / 2**30:.2f} GB"
    return f"{value:.{digits}g}{(' ' + unit) if unit else ''}"


def _met(value: float | None, ok: Any) -> bool | None:
    return None if value is None else bool(ok(value))


def summarise(report: Report) -> None:
    runs, rows = report.runs, report.rows
    med = lambda name, key: _median(_get(runs, name, key))  # noqa: E731

    def speed(stage: str, metric: str, ours: str, base: str, key: str, target: str = "", ok: Any = None) -> None:
        ratio = _ratio(runs, ours, base, key)
        rows.append(Row(stage, metric, fmt(med(ours, key)), fmt(med(base, key)), ratio, target,
                        _met(ratio, ok) if ok else None, _ratio(runs, ours, base, "cpu_" + key)))

    def memory(metric: str, ours: str, base: str, key: str, target: str = "", ok: Any = None) -> None:
        ratio = _ratio(runs, ours, base, key)
        rows.append(Row("train", metric, fmt(med(ours, key), "GB"), fmt(med(base, key), "GB"), ratio, target,
                        _met(ratio, ok) if ok else None))

    for kind, ours, base in (("full FT", "train-ours-full", "train-base-full"),
                             ("LoRA", "train-ours-lora", "train-base-lora")):
        if ours in runs:
            speed("train", f"{kind}: pairs/s", ours, base, "pairs_per_s", ">= 1.5x", lambda r: r >= 1.5)
            if kind == "LoRA":
                memory(f"{kind}: peak RSS (loop)", ours, base, "peak_rss", "<= 0.6x", lambda r: r <= 0.6)
            else:
                memory(f"{kind}: peak RSS (loop)", ours, base, "peak_rss")
            memory(f"{kind}: peak RSS (whole process)", ours, base, "process_peak_rss")
    if "train-ours-full-padded" in runs:
        speed("train", "ablation: full FT pairs/s, ours vs ours without packing", "train-ours-full",
              "train-ours-full-padded", "pairs_per_s")
        memory("ablation: full FT peak RSS, ours vs ours without packing", "train-ours-full",
               "train-ours-full-padded", "peak_rss")
    if "train-ours-lora-ckpt" in runs:
        speed("train", "option: LoRA pairs/s, with vs without gradient checkpointing", "train-ours-lora-ckpt",
              "train-ours-lora", "pairs_per_s")
        memory("option: LoRA + gradient checkpointing, peak RSS (loop) vs baseline LoRA", "train-ours-lora-ckpt",
               "train-base-lora", "peak_rss", "<= 0.6x", lambda r: r <= 0.6)
    if "score-ours" in runs:
        speed("score", "pairs/s (ref log-probs + 2 reward models)", "score-ours", "score-base", "pairs_per_s",
              "> 1x", lambda r: r > 1.0)
        for part, label in (("ref", "reference log-probs"), ("reward", "reward models")):
            share = {}
            for name in ("score-ours", "score-base"):
                share[name] = _median([x[f"{part}_tokens"] / x[f"{part}_slots"] for x in runs.get(name, [])
                                       if x.get(f"{part}_slots")])
            rows.append(Row("score", f"real-token share, {label}", fmt(share["score-ours"]),
                            fmt(share["score-base"]), None, ">= 0.9", _met(share["score-ours"], lambda v: v >= 0.9)))

        def part_ratio(a: str, b: str, key: str) -> float | None:
            return _median([y[key]["ref"] / x[key]["ref"] for x, y in zip(runs.get(a, []), runs.get(b, []))
                            if key in x and key in y])

        rows.append(Row("score", "reference log-probs alone: speed", "", "", part_ratio("score-ours", "score-base",
                        "parts_s"), cpu_ratio=part_ratio("score-ours", "score-base", "cpu_parts_s")))
        if "score-ours-padded" in runs:
            rows.append(Row("score", "ablation: reference log-probs, ours vs ours without packing", "", "",
                            part_ratio("score-ours", "score-ours-padded", "parts_s"),
                            cpu_ratio=part_ratio("score-ours", "score-ours-padded", "cpu_parts_s")))
    if "gen-ours" in runs:
        speed("generate", "tokens/s, transformers backend", "gen-ours", "gen-base", "tokens_per_s", "> 1x",
              lambda r: r > 1.0)
        vllm = runs.get("gen-vllm", [])
        if vllm and "tokens_per_s" in vllm[0]:
            speed("generate", "tokens/s, vLLM backend (engine start excluded)", "gen-vllm", "gen-base",
                  "tokens_per_s")
            report.notes.append(f"vLLM engine start: {fmt(med('gen-vllm', 'engine_start_s'))} s, once per run; "
                                "its responses run to the token limit (no EOS bias)")
        elif vllm:
            report.notes.append(f"vLLM: {vllm[0].get('skipped') or vllm[0].get('error')}")
    full = [r for r in runs.get("train-ours-full", []) if "matmul_flops" in r]
    if full:
        def fraction(tokens: str, per: str) -> float | None:
            loop, peak = ("loop_s", "matmul_flops") if per == "wall" else ("loop_cpu_s", "matmul_flops_cpu")
            return _median([6 * r["params"] * r[tokens] / r[loop] / r[peak] for r in full])

        achieved = _median([6 * r["params"] * r["unique_tokens"] / r["loop_s"] for r in full])
        rows.append(Row("efficiency", "full FT FLOP/s (6*params*tokens computed) / fp32 matmul FLOP/s",
                        fmt(achieved / 1e9, "GFLOP/s"), fmt(med("train-ours-full", "matmul_flops") / 1e9, "GFLOP/s"),
                        fraction("unique_tokens", "wall"), ">= 0.3", _met(fraction("unique_tokens", "wall"),
                        lambda v: v >= 0.3), fraction("unique_tokens", "cpu")))
        rows.append(Row("efficiency", "same, counting each pair's prompt twice (pair-equivalent work)", "", "",
                        fraction("sequence_tokens", "wall"), cpu_ratio=fraction("sequence_tokens", "cpu")))
    for name, results in runs.items():
        for r in results:
            if "error" in r:
                report.notes.append(f"{name} failed: {r['error']}")


def format_table(report: Report, markdown: bool = False) -> str:
    header = ["stage", "metric", "ours", "baseline", "ratio", "target", "met", "ratio (CPU time)"]
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    body = [[r.stage, r.metric, r.ours, r.baseline, x(r.ratio), r.target,
             "" if r.met is None else ("yes" if r.met else "NO"), x(r.cpu_ratio) if r.cpu_ratio else ""]
            for r in report.rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    title = f"modpo-pipe benchmark, size {report.size}, {report.repeats} repeat(s); {report.machine}"
    return "\n".join([title, *lines, *(f"note: {n}" for n in report.notes)])
