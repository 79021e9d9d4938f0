"""The demo's whole job head to head with TRL's GRPOTrainer at equal wall-clock (issue 20, the peer benchmark).

    python -m benchmarks.peers_grpo --out DIR [--pipeline-out DEMO_DIR] [--seed 0] [--eval-prompts 67]
                                    [--eval-samples 2] [--budget-factors 1,2] [--train-prompts N]
                                    [--grpo-beta 0]
    python -m benchmarks.peers_grpo --frontier --out DIR [--seed 0] ...   # issue 34: see peers/frontier_run.py
    ./dev.sh peers --out DIR ...      # the same, in the venv with the `peers` extra (TRL) installed

What it does, in order (each step skips work whose output already exists, so a killed run continues):
1. Pipeline: `modpo-pipe demo --out DIR/pipeline --seed S` (unless --pipeline-out names a finished demo) and
   read its DEMO_DIR/timing.json ({"front_seconds": sampling + scoring + training of all three policies, model
   conversion and evaluation excluded}) and DEMO_DIR/policies.json (label -> merged policy directory).
2. GRPO: for w_positivity in {0, 0.5, 1}, TRL's GRPOTrainer with reward_funcs = [positivity, concision] (the
   same functions as the demo's, modpo_pipe.builtin_rewards) and reward_weights = [w, 1 - w]. Its clock starts
   when training starts (model load excluded, as on the pipeline side); at each budget
   `factor * front_seconds / 3` (per policy: factor 1 gives the three GRPO policies together the pipeline's
   wall-clock for its whole front) the LoRA-merged policy is saved as a full safetensors model; training stops
   after the last budget. Time spent saving is not counted.
3. Evaluation: every policy (the reference, the pipeline's three, GRPO's three per budget factor) with
   `modpo-pipe eval` on the demo's held-out prompts, the demo's sampling settings, one seed for all.
4. Report: DIR/report.md, a table per budget factor, both fronts' hypervolumes above the reference policy and
   the issue's outcome checks, PASS/FAIL with their numbers.

Shared with the demo (so that only the method differs): SmolLM2-135M-Instruct, float32 on CPU; the demo's
training prompts with its system message (as many as the demo trains on, cycled when GRPO wants more); the
reply cap (max_new_tokens); LoRA r 16, alpha 32, dropout 0 on every linear layer (demo.LORA_TARGETS);
sampling at temperature 1, top_p 1; the demo's peak learning rate; the seed.

GRPO's settings (TRL 1.16.0, listed with their reasons in benchmarks/peers/grpo.py): its defaults,
except num_generations 4, the shared settings above, bf16 and gradient checkpointing off, a constant lr; beta 0
(TRL's) unless --grpo-beta gives one (a rerun reuses a finished GRPO policy only when it was trained with the
same beta). Nothing was tuned against the other side: the demo runs with its own defaults (its lr was chosen
for the demo's own criteria, issue 15's third outcome), and GRPO shares that lr.

`--frontier` runs issue 34's measurement instead (benchmarks/peers/frontier_run.py): reward against KL to the
reference, curves for both methods.

TRL is imported only inside the functions that train (install with `pip install -e '.[peers]'`); the tests
(tests/test_peers_grpo.py) run the rest without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.peers import REWARD_NAMES, WEIGHTS, report_or_error
from benchmarks.peers.grpo import GRPO_BETA, NUM_GENERATIONS, chats, train_grpo
from modpo_pipe.errors import ModpoError

# --- pure helpers: labels, budgets, contract files --------------------------------------------------------

def pipeline_label(w: float) -> str:
    """The demo's label for a policy in policies.json."""
    return f"w_positivity={w:.1f}"


def eval_label(side: str, w: float, factor: float | None = None) -> str:
    """A label `modpo-pipe eval --policies LABEL=PATH` accepts (no '='), e.g. grpo-x1-w0.5."""
    return f"pipeline-w{w:.1f}" if side == "pipeline" else f"grpo-x{factor:g}-w{w:.1f}"


def parse_factors(text: str) -> list[float]:
    """'1,2' -> [1.0, 2.0]: positive, distinct, ascending."""
    try:
        factors = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ModpoError(f"--budget-factors: expected comma-separated numbers, got {text!r}") from None
    if not factors or factors[0] <= 0 or not all(math.isfinite(f) for f in factors):
        raise ModpoError(f"--budget-factors: expected positive numbers, got {text!r}")
    return factors


def budget_seconds(front_seconds: float, factors: Sequence[float], policies: int = len(WEIGHTS)) -> list[float]:
    """GRPO's training seconds per policy at each factor: factor 1 gives its `policies` policies together the
    pipeline's wall-clock for its whole front (`front_seconds`)."""
    return [factor * front_seconds / policies for factor in factors]


def read_pipeline(demo_dir: Path) -> tuple[float, dict[str, str]]:
    """front_seconds and label -> policy dir from a finished demo directory; one-line errors naming the file."""
    timing_path, policies_path = demo_dir / "timing.json", demo_dir / "policies.json"
    timing, policies = _read_json(timing_path), _read_json(policies_path)
    front = timing.get("front_seconds") if isinstance(timing, dict) else None
    if not isinstance(front, (int, float)) or isinstance(front, bool) or not front > 0:
        raise ModpoError(f"{timing_path}: 'front_seconds' must be a positive number, got {front!r}")
    if not isinstance(policies, dict):
        raise ModpoError(f"{policies_path}: expected an object of label -> policy directory")
    out = {}
    for w in WEIGHTS:
        label = pipeline_label(w)
        path = policies.get(label)
        if not isinstance(path, str) or not path:
            raise ModpoError(f"{policies_path}: no policy for {label!r} (it has {sorted(policies)})")
        if not (Path(path) / "config.json").is_file():
            raise ModpoError(f"{policies_path}: {label}: {path} is not a model directory (no config.json)")
        out[label] = path
    return float(front), out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModpoError(f"{path}: missing; is {path.parent} a finished `modpo-pipe demo` directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModpoError(f"{path}: not valid JSON: {e}") from None


# --- the report (pure: eval summaries in, markdown out) -------------------------------------------------------

@dataclasses.dataclass
class Comparison:
    """One reward of one weight: the pipeline's policy against GRPO's, within one combined standard error."""

    w: float
    reward: str
    pipeline: float
    grpo: float
    combined_se: float

    @property
    def ok(self) -> bool:
        return self.pipeline >= self.grpo - self.combined_se


@dataclasses.dataclass
class Outcome:
    factor: float
    comparisons: list[Comparison]
    hv_pipeline: float
    hv_grpo: float
    hv_sem: dict[str, float]

    @property
    def hv_ratio(self) -> float:
        if self.hv_grpo > 0:
            return self.hv_pipeline / self.hv_grpo
        return math.inf if self.hv_pipeline > 0 else math.nan

    @property
    def hv_ok(self) -> bool:
        # A front with no volume passes nothing, even against another with none (0 >= 1.2 * 0 would).
        return self.hv_pipeline > 0 and self.hv_pipeline >= 1.2 * self.hv_grpo

    @property
    def passed(self) -> bool:
        return self.hv_ok and all(c.ok for c in self.comparisons)


def by_label(summaries: list[dict[str, Any]], wanted: dict[str, str], ref_path: str) -> dict[str, dict[str, Any]]:
    """Eval summaries keyed by label, one for every label in `wanted` (label -> path). `modpo-pipe eval` leaves
    out a policy whose path is the reference's own: such a label gets the reference's summary."""
    found = {s["label"]: s for s in summaries}
    ref = next((s for s in summaries if s["is_reference"]), None)
    if ref is None:
        raise ModpoError("the eval summaries hold no reference policy")
    out = {"reference": ref}
    for label, path in wanted.items():
        if label in found:
            out[label] = found[label]
        elif _same_path(path, ref_path):
            out[label] = {**ref, "label": label, "is_reference": False}
        else:
            raise ModpoError(f"the eval summaries hold no policy {label!r} ({path})")
    return out


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def outcome(entries: dict[str, dict[str, Any]], factor: float) -> Outcome:
    """The issue's measured outcome 1 at one budget factor, from summaries keyed by eval_label()."""
    from modpo_pipe.evaluate import family_hypervolumes

    comparisons = []
    for w in (WEIGHTS[0], WEIGHTS[-1]):  # the single-objective ends; the middles differ in meaning between methods
        ours, theirs = entries[eval_label("pipeline", w)], entries[eval_label("grpo", w, factor)]
        for name in REWARD_NAMES:
            a, b = ours["rewards"][name], theirs["rewards"][name]
            comparisons.append(Comparison(w, name, a["mean"], b["mean"], math.hypot(a["sem"], b["sem"])))
    front = [entries["reference"]]
    front += [{**entries[eval_label("pipeline", w)], "family": "modpo-pipe"} for w in WEIGHTS]
    front += [{**entries[eval_label("grpo", w, factor)], "family": "GRPO"} for w in WEIGHTS]
    volumes = family_hypervolumes(front, list(REWARD_NAMES))
    return Outcome(factor, comparisons, volumes["modpo-pipe"]["hypervolume"], volumes["GRPO"]["hypervolume"],
                   {family: v["sem"] for family, v in volumes.items()})


def _cell(estimate: dict[str, float] | None, fmt: str) -> str:
    if estimate is None:
        return "n/a"
    return f"{estimate['mean']:{fmt}} ± {estimate['sem']:.3f}" if fmt.startswith("+") else f"{estimate['mean']:{fmt}}"


def format_table(entries: dict[str, dict[str, Any]], factor: float) -> str:
    rows = [("reference", entries["reference"])]
    rows += [(f"GRPO ×{factor:g}, w_positivity {w:g}", entries[eval_label("grpo", w, factor)]) for w in WEIGHTS]
    rows += [(f"modpo-pipe, w_positivity {w:g}", entries[eval_label("pipeline", w)]) for w in WEIGHTS]
    lines = ["| policy | positivity | concision | tokens | KL to ref |", "|---|---|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {_cell(s['rewards']['positivity'], '+.3f')} | "
                     f"{_cell(s['rewards']['concision'], '+.3f')} | {_cell(s.get('response_tokens'), '.1f')} | "
                     f"{_cell(s.get('kl_to_ref'), '.2f')} |")
    return "\n".join(lines)


def format_outcome(result: Outcome, number: int) -> str:
    given = "the pipeline's wall-clock" if result.factor == 1 else f"{result.factor:g}x the pipeline's wall-clock"
    lines = [f"**Check {number}** (GRPO given {given}): **{'PASS' if result.passed else 'FAIL'}**", ""]
    for c in result.comparisons:
        verdict = "ok" if c.ok else "WORSE"
        lines.append(f"- w_positivity {c.w:g}, {c.reward}: modpo-pipe {c.pipeline:+.3f} vs GRPO {c.grpo:+.3f}, "
                     f"combined s.e. {c.combined_se:.3f} (difference {c.pipeline - c.grpo:+.3f}): {verdict}")
    lines.append(f"- hypervolume above the reference: modpo-pipe {result.hv_pipeline:.4g} "
                 f"(± {result.hv_sem.get('modpo-pipe', math.nan):.2g}), GRPO {result.hv_grpo:.4g} "
                 f"(± {result.hv_sem.get('GRPO', math.nan):.2g}); ratio {result.hv_ratio:.3g} (needs >= 1.2 and a "
                 f"front with volume): {'ok' if result.hv_ok else 'FAIL'}")
    return "\n".join(lines)


def format_report(entries: dict[str, dict[str, Any]], factors: Sequence[float], front_seconds: float,
                  grpo_runs: dict[str, Any], settings_note: str) -> tuple[str, list[Outcome]]:
    """The whole report and the outcome per factor (1-based check numbers follow the factors)."""
    outcomes = [outcome(entries, f) for f in factors]
    ref = entries["reference"]
    samples = ref.get("samples")
    lines = ["# modpo-pipe vs TRL GRPOTrainer at equal wall-clock", "",
             f"Pipeline front (sampling + scoring + training of all three policies): {front_seconds:.0f} s. "
             f"Evaluated with `modpo-pipe eval`, {samples} replies per policy, one seed for all.", "",
             settings_note, ""]
    for result in outcomes:
        budget = budget_seconds(front_seconds, [result.factor])[0]
        lines += [f"## Budget factor {result.factor:g}: GRPO {budget:.0f} s per policy", "",
                  format_table(entries, result.factor), ""]
        for w in WEIGHTS:
            run = grpo_runs.get(f"{w:.1f}", {}).get(f"{result.factor:g}")
            if run:
                lines.append(f"- GRPO w_positivity {w:g}: saved after {run['seconds']:.0f} s of training, "
                             f"{run['steps']} steps, {run['replies']} replies")
        lines.append("")
    lines.append("## Outcome checks")
    for number, result in enumerate(outcomes, 1):
        lines += ["", format_outcome(result, number)]
    return "\n".join(lines) + "\n", outcomes


# --- side effects: the pipeline, GRPO, the evaluation ---------------------------------------------------------

def run_pipeline(demo_dir: Path, seed: int) -> None:
    command = [sys.executable, "-m", "modpo_pipe", "demo", "--out", str(demo_dir), "--seed", str(seed)]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise ModpoError(f"the pipeline's demo failed (see above); its files are in {demo_dir}")


def grpo_done(runs: dict[str, Any], w: float, factors: Sequence[float], beta: float, out: Path) -> bool:
    """Whether a killed run's GRPO policy for w is finished at every budget, with this beta (a run made with
    another beta is trained again, not reused)."""
    done = runs.get(f"{w:.1f}", {})
    return all(f"{f:g}" in done and done[f"{f:g}"].get("beta", GRPO_BETA) == beta
               and (out / "grpo" / f"w_positivity-{w:.1f}" / f"x{f:g}").is_dir() for f in factors)


def write_eval_settings(path: Path, ref_dir: Path, seed: int) -> Path:
    """The demo's sampling, scoring and model settings as a TOML that `modpo-pipe eval -c` reads."""
    from modpo_pipe import config as cfg
    from modpo_pipe.demo import DemoSize, demo_settings

    path.write_text(cfg.render_settings(demo_settings(str(ref_dir), DemoSize(seed=seed)),
                                        ("model", "generate", "score")), encoding="utf-8")
    cfg.load_settings(path)  # what we write must load
    return path


def run_eval(heldout: Path, toml: Path, ref_dir: Path, policies: dict[str, str], samples: int, out: Path) -> None:
    command = [sys.executable, "-m", "modpo_pipe", "eval", str(heldout), "-c", str(toml), "--summary-out", str(out),
               "--samples-per-prompt", str(samples)]
    for label, path in policies.items():
        command += ["--policies", f"{label}={path}"]
    print("$ " + " ".join(command[:4]) + " ...", flush=True)
    if subprocess.run(command).returncode != 0:
        raise ModpoError("the evaluation failed (see above)")


def settings_note(factors: Sequence[float], train_prompts: int, seed: int, beta: float = GRPO_BETA) -> str:
    kl = ("beta 0 (no KL term), " if beta == 0 else f"beta {beta:g} (a KL term to the reference; TRL's default is 0), ")
    return (f"GRPO (TRL GRPOTrainer): {NUM_GENERATIONS} generations per prompt, batch 8 replies, the demo's lr, "
            f"reply cap, LoRA, float32, temperature 1; {kl}loss dapo, group-scaled rewards (TRL's defaults); "
            "constant lr, no gradient checkpointing, no bf16 (see benchmarks/peers/grpo.py). "
            f"Training prompts: the demo's first {train_prompts}, cycled. Seed {seed}. "
            f"Budget factors: {', '.join(f'{f:g}' for f in factors)}.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--frontier" in argv:  # issue 34's curves: a mode of its own, with its own flags
        from benchmarks.peers import frontier_run

        return frontier_run.main([arg for arg in argv if arg != "--frontier"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Directory for everything the benchmark writes.")
    parser.add_argument("--pipeline-out", type=Path, help="A finished demo directory (default: run the demo).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=67, help="Held-out prompts (the first N).")
    parser.add_argument("--eval-samples", type=int, default=2, help="Replies per held-out prompt and policy.")
    parser.add_argument("--budget-factors", default="1,2", help="GRPO's wall-clock as multiples of the pipeline's.")
    parser.add_argument("--train-prompts", type=int, default=0, help="GRPO's training prompts (0: the demo's).")
    parser.add_argument("--grpo-beta", type=float, default=GRPO_BETA,
                        help="GRPO's KL coefficient (default 0, TRL's: no KL term; the issue's first run used 0.04).")
    args = parser.parse_args(argv)
    return report_or_error(lambda: run(args))


def run(args: argparse.Namespace) -> str:
    from modpo_pipe.demo import EXAMPLES, DemoSize, demo_prompts
    from modpo_pipe.embedded import embedded_policy_dir
    from modpo_pipe.evaluate import read_summaries

    factors = parse_factors(args.budget_factors)
    train_prompts = args.train_prompts or DemoSize().train_prompts
    if args.eval_prompts < 1 or args.eval_samples < 1 or train_prompts < 1:
        raise ModpoError("--eval-prompts, --eval-samples and --train-prompts must be at least 1")
    if not (math.isfinite(args.grpo_beta) and args.grpo_beta >= 0):
        raise ModpoError(f"--grpo-beta must be a finite number >= 0, not {args.grpo_beta}")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ref_dir = embedded_policy_dir().resolve()

    demo_dir = args.pipeline_out.resolve() if args.pipeline_out else out / "pipeline"
    if not args.pipeline_out and not (demo_dir / "policies.json").is_file():
        run_pipeline(demo_dir, args.seed)
    front_seconds, pipeline = read_pipeline(demo_dir)
    budgets = budget_seconds(front_seconds, factors)
    print(f"pipeline front: {front_seconds:.0f} s; GRPO budget per policy: "
          + ", ".join(f"x{f:g} {b:.0f} s" for f, b in zip(factors, budgets)), flush=True)

    prompts = chats(demo_prompts(EXAMPLES / "prompts.jsonl", out / "train-prompts.jsonl", train_prompts))
    runs_path = out / "grpo" / "runs.json"
    grpo_runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    for w in WEIGHTS:
        key, target = f"{w:.1f}", out / "grpo" / f"w_positivity-{w:.1f}"
        if grpo_done(grpo_runs, w, factors, args.grpo_beta, out):
            continue
        print(f"\n== GRPO w_positivity={w:g}, w_concision={1 - w:g}, beta {args.grpo_beta:g}", flush=True)
        grpo_runs[key] = train_grpo(w, factors, budgets, prompts, ref_dir, target, args.seed, args.grpo_beta)
        runs_path.write_text(json.dumps(grpo_runs, indent=2) + "\n")

    policies = {eval_label("pipeline", w): pipeline[pipeline_label(w)] for w in WEIGHTS}
    policies |= {eval_label("grpo", w, f): str(out / "grpo" / f"w_positivity-{w:.1f}" / f"x{f:g}")
                 for f in factors for w in WEIGHTS}
    summary_path = out / "eval.json"
    stamp = {"policies": policies, "eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples,
             "seed": args.seed}
    stamp_path = out / "eval-inputs.json"
    if not summary_path.is_file() or not stamp_path.is_file() or json.loads(stamp_path.read_text()) != stamp:
        heldout = demo_prompts(EXAMPLES / "heldout.jsonl", out / "heldout-prompts.jsonl", args.eval_prompts)
        toml = write_eval_settings(out / "eval.toml", ref_dir, args.seed)
        run_eval(heldout, toml, ref_dir, policies, args.eval_samples, summary_path)
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    entries = by_label(read_summaries([summary_path]), policies, str(ref_dir))
    report, _ = format_report(entries, factors, front_seconds, grpo_runs,
                              settings_note(factors, train_prompts, args.seed, args.grpo_beta))
    (out / "report.md").write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    sys.exit(main())
