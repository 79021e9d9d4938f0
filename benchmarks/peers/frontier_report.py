"""The frontier's report (markdown) from frontier.json's contents: every point, the comparisons of frontier.py,
the outcome checks of issue 34 with their numbers, and every setting of both sides. Pure: data in, text out."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from benchmarks.peers import REWARD_NAMES, WEIGHTS
from benchmarks.peers.frontier import (
    ENDS,
    HV_BUDGET,
    HV_RATIO,
    KL_BUDGETS,
    PIPELINE,
    Match,
    Outcome,
    curve,
    grpo_methods,
    matched,
    max_kl,
    members,
    outcome,
    own_seconds,
    shared_seconds,
)


def _est(estimate: dict[str, float] | None, fmt: str, sem_fmt: str = ".3f") -> str:
    if not estimate:
        return "n/a"
    return f"{estimate['mean']:{fmt}} ± {estimate['sem']:{sem_fmt}}"


def _share(estimate: dict[str, float] | None) -> str:
    return f"{100 * estimate['mean']:.0f}%" if estimate else "n/a"


def format_points(data: dict[str, Any]) -> str:
    """Every evaluated policy: rewards, KL, reply length and the reward-hacking indicators, and its cost."""
    lines = ["| method | w_positivity | β or step | KL to ref | positivity | concision | tokens | at the cap | "
             "words | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    ref = data["summaries"][data["reference"]]
    lines.append(_point_row("reference", "", "", ref, None))
    for method in [PIPELINE, *grpo_methods(data)]:
        for w in WEIGHTS:
            rows = sorted(members(data, method, w), key=lambda p: data["summaries"][p["label"]]["kl_to_ref"]["mean"])
            for p in rows:
                knob = f"β {p['beta']:g}" if method == PIPELINE else f"step {p['step']}"
                lines.append(_point_row(method, f"{w:g}", knob, data["summaries"][p["label"]], p.get("seconds")))
    return "\n".join(lines)


def _point_row(method: str, w: str, knob: str, s: dict[str, Any], seconds: float | None) -> str:
    r = s["rewards"]
    cost = f"{seconds:.0f}" if seconds is not None else ""
    return (f"| {method} | {w} | {knob} | {_est(s.get('kl_to_ref'), '.2f', '.2f')} | {_est(r['positivity'], '+.3f')} | "
            f"{_est(r['concision'], '+.3f')} | {_est(s.get('response_tokens'), '.1f', '.1f')} | "
            f"{_share(s.get('at_cap'))} | {_est(s.get('response_words'), '.1f', '.1f')} | {cost} |")


def _worst(matches: list[Match]) -> Match | None:
    """The comparison with the least margin over failing (difference + combined s.e.; below 0 fails)."""
    return min(matches, key=lambda m: m.diff + m.combined_se, default=None)


def format_matched(data: dict[str, Any], method: str) -> str:
    """Per weight and reward: the KL range both curves reach and how the pipeline's reward compares there; then
    every compared KL of the outcome's single-objective ends."""
    lines = [f"| w_positivity | reward | common KL range | KLs compared | mean difference | worst difference "
             f"(combined s.e.) | modpo-pipe at or above {method} within 1 s.e. |", "|---|---|---|---|---|---|---|"]
    for w in WEIGHTS:
        for name in REWARD_NAMES:
            ms = matched(curve(data, PIPELINE, w, name), curve(data, method, w, name))
            if not ms:
                lines.append(f"| {w:g} | {name} | none beyond the reference | 0 | | | |")
                continue
            worst = _worst(ms)
            mean_diff = sum(m.diff for m in ms) / len(ms)
            lines.append(f"| {w:g} | {name} | 0 to {ms[-1].kl:.2f} | {len(ms)} | {mean_diff:+.3f} | "
                         f"{worst.diff:+.3f} at KL {worst.kl:.2f} ({worst.combined_se:.3f}) | "
                         f"{sum(m.ok for m in ms)} of {len(ms)} |")
    for w, name in ENDS:
        lines += ["", f"w_positivity {w:g}, {name}:", "",
                  f"| KL | modpo-pipe | {method} | difference | combined s.e. | |", "|---|---|---|---|---|---|"]
        for m in matched(curve(data, PIPELINE, w, name), curve(data, method, w, name)):
            lines.append(f"| {m.kl:.2f} | {m.ours:+.3f} ± {m.ours_sem:.3f} | {m.theirs:+.3f} ± {m.theirs_sem:.3f} | "
                         f"{m.diff:+.3f} | {m.combined_se:.3f} | {'ok' if m.ok else 'WORSE'} |")
    return "\n".join(lines)


def format_volumes(outcomes: list[Outcome]) -> str:
    head = "| K (nats) | modpo-pipe | " + " | ".join(f"{o.method} | ratio" for o in outcomes) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(outcomes)]
    for k in outcomes[0].volumes:
        ours = outcomes[0].volumes[k][0]
        cells = [f"{k:g}", _volume(ours)]
        for o in outcomes:
            theirs = o.volumes[k][1]
            ratio = ours.hypervolume / theirs.hypervolume if theirs.hypervolume > 0 else math.nan
            cells += [_volume(theirs), "n/a" if math.isnan(ratio) else f"{ratio:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _volume(v: Any) -> str:
    return f"{v.hypervolume:.4g} ± {v.sem:.2g} ({len(v.labels)} policies)"


def format_costs(data: dict[str, Any], outcomes: list[Outcome]) -> str:
    stages = data["pipeline_stages"]
    shared = shared_seconds(stages)
    lines = [f"- modpo-pipe, {len(data['settings']['betas'])} β × 3 weights: {outcomes[0].pipeline_seconds:.0f} s "
             f"= round 0 sampled and scored once, {shared:.0f} s, + every run's own stages:"]
    for beta in data["settings"]["betas"]:
        runs = sorted({p["run"] for p in members(data, PIPELINE) if p["beta"] == beta})
        lines.append(f"  - β {beta:g}: {own_seconds(stages, runs):.0f} s")
    for o in outcomes:
        reached = all(c.reached for c in o.grpo_costs.values())
        whole = sum(max(p["seconds"] for p in members(data, o.method, w)) for w in WEIGHTS)
        lines.append(f"- {o.method}, matching front: {o.grpo_seconds:.0f} s"
                     + ("" if reached else " (a lower bound: a run did not reach the pipeline's KL)")
                     + f"; its whole runs: {whole:.0f} s")
        for w, c in o.grpo_costs.items():
            lines.append(f"  - w_positivity {w:g}: {c.seconds:.0f} s to step {c.step} (KL {c.kl:.2f}; the "
                         f"pipeline's curve reaches {c.target_kl:.2f})" + ("" if c.reached else ": not reached"))
    return "\n".join(lines)


def format_checks(outcomes: list[Outcome]) -> str:
    lines = []
    for number, check in enumerate((_check_matched, _check_volume, _check_cost), 1):
        for o in outcomes:
            passed, detail = check(o)
            lines += [f"**Check {number}, against {o.method}: {'PASS' if passed else 'FAIL'}**", "", *detail, ""]
    return "\n".join(lines).rstrip() + "\n"


def _check_matched(o: Outcome) -> tuple[bool, list[str]]:
    lines = []
    for w, name in ENDS:
        ms = o.matches[(w, name)]
        if not ms:
            lines.append(f"- w_positivity {w:g}, {name}: no KL beyond the reference that both curves reach: FAIL")
            continue
        worst = _worst(ms)
        lines.append(f"- w_positivity {w:g}, {name}: {sum(m.ok for m in ms)} of {len(ms)} KLs in 0 to "
                     f"{ms[-1].kl:.2f} at or above GRPO within one combined s.e.; worst at KL {worst.kl:.2f}: "
                     f"modpo-pipe {worst.ours:+.3f} vs {worst.theirs:+.3f} (difference {worst.diff:+.3f}, combined "
                     f"s.e. {worst.combined_se:.3f})")
    return o.matched_ok, lines


def _check_volume(o: Outcome) -> tuple[bool, list[str]]:
    ours, theirs = o.volumes[HV_BUDGET]
    return o.hv_ok, [f"- hypervolume within KL {HV_BUDGET:g}: modpo-pipe {ours.hypervolume:.4g} ± {ours.sem:.2g}, "
                     f"{o.method} {theirs.hypervolume:.4g} ± {theirs.sem:.2g}; ratio {o.hv_ratio:.3g} (needs >= "
                     f"{HV_RATIO:g} and a front with volume)"]


def _check_cost(o: Outcome) -> tuple[bool, list[str]]:
    bound = "" if all(c.reached for c in o.grpo_costs.values()) else " (a lower bound)"
    return o.cost_ok, [f"- whole front: modpo-pipe {o.pipeline_seconds:.0f} s against {o.method}'s matching front "
                       f"{o.grpo_seconds:.0f} s{bound}"]


def format_settings(data: dict[str, Any]) -> str:
    s = data["settings"]
    grpo = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in s["grpo"].items())
    return "\n".join([
        f"Seed {s['seed']}. Evaluation: the first {s['eval']['prompts']} held-out prompts with the demo's system "
        f"message, replies per prompt: {s['eval']['samples']}; every policy in one `evaluate` call (one sampling seed, "
        f"the demo's sampling settings); KL estimated from each policy's own replies; 'at the cap': the share of "
        f"replies stopped by the {s['eval']['max_new_tokens']}-token cap; 'words': whitespace-split words per reply "
        "(what concision counts).", "",
        f"modpo-pipe: the default demo at β {', '.join(f'{b:g}' for b in s['betas'])} (everything else its "
        "defaults); one run directory per β and weight, round 0 sampled and scored once for all. The first run's "
        "settings (the others differ in `beta` and `weights` only):", "", "```toml", s["pipeline_toml"].strip(),
        "```", "",
        f"GRPO (TRL {s.get('trl_version', '?')} GRPOTrainer), β {', '.join(f'{b:g}' for b in s['grpo_betas'])}, "
        f"LoRA adapters saved at steps {', '.join(map(str, s['grpo_steps']))}; its settings as TRL ran them "
        "(reasons in benchmarks/peers/grpo.py):", "", "| setting | value |", "|---|---|", grpo])


def format_report(data: dict[str, Any], budgets: Sequence[float] = KL_BUDGETS) -> tuple[str, list[Outcome]]:
    outcomes = [outcome(data, method, budgets) for method in grpo_methods(data)]
    lines = [f"# Reward at equal KL: modpo-pipe against TRL's GRPOTrainer (seed {data['settings']['seed']})", "",
             "## Outcome checks (issue 34)", "", format_checks(outcomes),
             "## Every policy", "", "Seconds: a pipeline run's own stages (round 0's shared sampling and scoring "
             "apart, see the costs); GRPO's training time to that checkpoint.", "", format_points(data), ""]
    for o in outcomes:
        lines += [f"## Reward at matched KL: modpo-pipe against {o.method}", "", format_matched(data, o.method), ""]
    lines += ["## Hypervolume above the reference within a KL budget", "", format_volumes(outcomes), "",
              "## Cost of a whole front (wall-clock; evaluation not counted)", "", format_costs(data, outcomes), ""]
    for o in outcomes:
        for w in WEIGHTS:
            if max_kl(data, o.method, w) < max_kl(data, PIPELINE, w):
                lines.append(f"- note: {o.method}'s curve at w_positivity {w:g} ends at KL "
                             f"{max_kl(data, o.method, w):.2f}, below the pipeline's {max_kl(data, PIPELINE, w):.2f}: "
                             "a longer --grpo-steps would cover it")
    lines += ["", "## Settings", "", format_settings(data)]
    return "\n".join(lines) + "\n", outcomes


def format_combined(datas: list[dict[str, Any]], budgets: Sequence[float] = KL_BUDGETS) -> str:
    """Every seed's outcome checks in one table, then each seed's report."""
    reports = [format_report(d, budgets) for d in datas]
    seeds = [d["settings"]["seed"] for d in datas]
    lines = ["# Reward at equal KL: modpo-pipe against TRL's GRPOTrainer, seeds " + ", ".join(map(str, seeds)), "",
             "| check | against | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    names = ("1: single-objective rewards at matched KL", f"2: hypervolume within KL {HV_BUDGET:g} >= "
             f"{HV_RATIO:g}x", "3: whole front costs less")
    for number, name in enumerate(names):
        for i, o in enumerate(reports[0][1]):
            cells = []
            for _, outcomes in reports:
                passed = (outcomes[i].matched_ok, outcomes[i].hv_ok, outcomes[i].cost_ok)[number]
                cells.append("PASS" if passed else "FAIL")
            lines.append(f"| {name} | {o.method} | " + " | ".join(cells) + " |")
    for text, _ in reports:
        lines += ["", _demoted(text)]
    return "\n".join(lines) + "\n"


def _demoted(markdown: str) -> str:
    """Every heading one level down (a seed's report inside the combined one); code blocks left alone."""
    out, in_code = [], False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        out.append("#" + line if line.startswith("#") and not in_code else line)
    return "\n".join(out)
