"""`python -m benchmarks.peers_grpo --frontier`: reward against KL to the reference, modpo-pipe against TRL's
GRPOTrainer (issue 34). One seed per run; `--combine` joins finished seeds.

    python -m benchmarks.peers_grpo --frontier --out DIR [--seed 0] [--betas 0.05,0.1,0.2,0.4]
        [--grpo-betas 0,0.04] [--grpo-steps 2,4,6,8,10,13,16,20] [--kl-budgets 2,5,10]
        [--eval-prompts 67] [--eval-samples 1]
    python -m benchmarks.peers_grpo --frontier --combine DIR_S0 DIR_S1 --out DIR
    ./dev.sh peers --frontier ...     # the same, in the venv with the `peers` extra (TRL) installed

What it does, in order (each step skips work whose output already exists, so a killed run continues):
1. modpo-pipe: the default demo (demo.demo_settings at the default DemoSize) at every --betas value, all else
   the demo's: a run directory per beta and weight vector, DIR/pipeline/beta-B/w_positivity-W, advanced by
   rounds.advance. Round 0 samples from the reference whatever the beta and weight: the first run samples
   and scores it, the others take verified copies (rounds.share_stages). Each stage's seconds come from the
   runs' manifests.
2. GRPO: per --grpo-betas value and weight vector, one run of TRL's GRPOTrainer (benchmarks/peers/grpo.py:
   the equal-time benchmark's settings) to the last of --grpo-steps, its LoRA adapter saved at each of them
   (DIR/grpo/beta-B/w_positivity-W/step-NNNN; the clock stops while saving). DIR/grpo/.../run.json records
   each checkpoint's training seconds and the settings TRL ran with; a rerun reuses a run whose record holds
   every asked step with the same settings, and trains any other again from step 0.
3. Evaluation: every policy and the reference in one modpo_pipe.evaluate.evaluate call, on the demo's
   held-out prompts with its system message and sampling settings (adapters are merged into the reference as
   they load). The replies it samples also give the reward-hacking indicators: the share at the token cap and
   the words per reply.
4. DIR/frontier.json (every point, each stage's seconds, every setting), DIR/frontier.md (frontier_report)
   and DIR/frontier.png (picture.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.peers import WEIGHTS, report_or_error
from benchmarks.peers.frontier import KL_BUDGETS, PIPELINE, grpo_method, own_seconds
from modpo_pipe.errors import ModpoError

BETAS = (0.05, 0.1, 0.2, 0.4)
GRPO_BETAS = (0.0, 0.04)  # TRL's default, and the first setting
# Dense where the pipeline's policies sit (KL 1 to 10 at 1 to 2 nats a step in the equal-time runs), and on to
# where GRPO went past every pipeline policy there (12 to 29 steps).
GRPO_STEPS = (2, 4, 6, 8, 10, 13, 16, 20)
REFERENCE = "reference"


def parse_numbers(text: str, flag: str, integers: bool = False) -> list[float]:
    """'0.2, 0.05' -> [0.05, 0.2]: distinct, ascending, finite, >= 0 (> 0 for integers)."""
    try:
        values = sorted({(int if integers else float)(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ModpoError(f"{flag}: expected comma-separated {'whole ' if integers else ''}numbers, "
                         f"got {text!r}") from None
    if not values or values[0] < (1 if integers else 0) or not all(math.isfinite(v) for v in values):
        raise ModpoError(f"{flag}: expected {'positive whole' if integers else 'finite, non-negative'} numbers, "
                         f"got {text!r}")
    return values


# --- 1. the pipeline at several betas --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PipelineRun:
    dir: Path
    settings: Any  # modpo_pipe.config.Settings
    beta: float
    w: float


def run_label(beta: float, w: float) -> str:
    return f"b{beta:g}-w{w:.1f}"


def pipeline_runs(root: Path, ref_dir: Path, size: Any, betas: list[float], prompts: Path) -> dict[str, PipelineRun]:
    """A run directory with its modpo.toml per beta and weight vector: the demo's settings, beta and weights
    replaced."""
    from benchmarks.peers.grpo import weights_info
    from modpo_pipe import config as cfg
    from modpo_pipe import demo

    base = demo.demo_settings(str(ref_dir), size, str(prompts.resolve()))
    runs = {}
    for beta in betas:
        for w in WEIGHTS:
            train = dataclasses.replace(base.train, beta=beta, weights=weights_info(w))
            settings = dataclasses.replace(base, train=train)
            run_dir = root / f"beta-{beta:g}" / f"w_positivity-{w:.1f}"
            demo.write_text(run_dir / "modpo.toml", cfg.render_settings(settings))
            runs[run_label(beta, w)] = PipelineRun(run_dir, settings, beta, w)
    return runs


def advance_pipeline(runs: dict[str, PipelineRun], log: Any) -> None:
    """Every run to its last round; round 0's sampling and scoring once, by the first run."""
    from modpo_pipe import rounds

    first, *others = runs.values()
    rounds.advance(first.dir, first.settings, log=log)
    for run in others:
        rounds.share_stages(first.dir, run.dir, run.settings, 0, log=log)
        rounds.advance(run.dir, run.settings, log=log)


def stage_seconds(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Each stage's recorded seconds, marked when the stage is a copy from another run (counted there)."""
    from modpo_pipe.runstate import Manifest, round_name

    out = {}
    for k, stages in sorted(Manifest.load(run_dir).data["rounds"].items(), key=lambda item: int(item[0])):
        for stage, record in stages.items():
            out[f"{round_name(int(k))} {stage}"] = {"seconds": float(record.get("seconds", 0.0)),
                                                    "shared": "shared_from" in record}
    return out


def pipeline_side(out: Path, ref_dir: Path, size: Any, betas: list[float], log: Any) -> tuple[list, dict, str]:
    """Policy records and stage seconds of the pipeline's runs (trained first where needed), and the first run's
    settings as TOML."""
    from modpo_pipe import config as cfg
    from modpo_pipe import demo
    from modpo_pipe.runstate import round_name

    prompts = demo.demo_prompts(demo.EXAMPLES / "prompts.jsonl", out / "train-prompts.jsonl", size.train_prompts)
    runs = pipeline_runs(out / "pipeline", ref_dir, size, betas, prompts)
    advance_pipeline(runs, log)
    stages = {label: stage_seconds(run.dir) for label, run in runs.items()}
    policies = [{"label": f"pipeline-{label}", "method": PIPELINE, "w": run.w, "beta": run.beta, "run": label,
                 "seconds": own_seconds(stages, [label]),  # round 0's shared stages apart
                 "path": str((run.dir / round_name(size.rounds - 1) / "policy").resolve())}
                for label, run in runs.items()]
    return policies, stages, cfg.render_settings(next(iter(runs.values())).settings)


# --- 2. GRPO along its runs --------------------------------------------------------------------------------------

def grpo_stamp(beta: float, w: float, prompts: list, demo_settings: Any, ref_dir: Path) -> dict[str, Any]:
    """What a GRPO run's checkpoints depend on: a rerun with anything else trains again."""
    from modpo_pipe import models, storage

    t, g = demo_settings.train, demo_settings.generate
    return {"beta": beta, "w": w, "prompts": storage.json_fingerprint(prompts), "seed": t.seed, "lr": t.lr,
            "lora": [t.lora_r, t.lora_alpha], "max_new_tokens": g.max_new_tokens, "temperature": g.temperature,
            "top_p": g.top_p, "reference": models.fingerprint(str(ref_dir))}


def reusable(record: dict[str, Any] | None, stamp: dict[str, Any], steps: list[int], run_dir: Path) -> bool:
    """Whether a run's record (run.json) was made with these settings and holds every asked step, on disk."""
    from benchmarks.peers.grpo import checkpoint_dir

    return (record is not None and record.get("stamp") == stamp
            and all(str(s) in record["checkpoints"] and checkpoint_dir(run_dir, s).is_dir() for s in steps))


def grpo_side(out: Path, ref_dir: Path, size: Any, grpo_betas: list[float], steps: list[int],
              log: Any) -> tuple[list, dict[str, Any]]:
    """Policy records of every GRPO checkpoint asked for (trained where needed), and the settings TRL ran with
    (of the first run)."""
    from benchmarks.peers import grpo
    from modpo_pipe import demo, storage

    demo_settings = demo.demo_settings(str(ref_dir), size)
    prompts = grpo.chats(demo.demo_prompts(demo.EXAMPLES / "prompts.jsonl", out / "train-prompts.jsonl",
                                           size.train_prompts))
    policies, settings = [], {}
    for beta in grpo_betas:
        for w in WEIGHTS:
            run_dir = out / "grpo" / f"beta-{beta:g}" / f"w_positivity-{w:.1f}"
            record_path = run_dir / "run.json"
            record = json.loads(record_path.read_text()) if record_path.is_file() else None
            stamp = grpo_stamp(beta, w, prompts, demo_settings, ref_dir)
            if not reusable(record, stamp, steps, run_dir):
                log(f"GRPO beta {beta:g}, w_positivity {w:g}: training to step {steps[-1]}")
                # The new run overwrites the old one's checkpoints as it goes: a kill half way must not leave
                # them described by the old record.
                record_path.unlink(missing_ok=True)
                record = {"stamp": stamp, **grpo.train_grpo_steps(w, beta, steps, prompts, ref_dir, run_dir,
                                                                   demo_settings)}
                storage.write_atomic(record_path, json.dumps(record, indent=2) + "\n")
            settings = settings or {**record["settings"], "trl_version": record["trl_version"]}
            policies += [{"label": f"grpo-b{beta:g}-w{w:.1f}-s{step:04d}", "method": grpo_method(beta), "w": w,
                          "beta": beta, "step": step, "seconds": record["checkpoints"][str(step)]["seconds"],
                          "path": str(grpo.checkpoint_dir(run_dir, step))} for step in steps]
    return policies, settings


# --- 3. one evaluation of every policy ------------------------------------------------------------------------------

@contextlib.contextmanager
def recorded_replies() -> Iterator[dict[str, list]]:
    """The replies evaluate() samples, per policy path. evaluate() keeps only summary statistics of them, and the
    reward-hacking indicators need each reply's end and words: reading them here costs no second sampling pass
    and describes the very replies the rewards and KL were measured on. evaluate() imports
    modpo_pipe.generate.sample when it runs, so it calls this wrapper while the block is open."""
    import modpo_pipe.generate as generate

    real, seen = generate.sample, {}

    def recording(settings: Any, policy: str, *args: Any, **kwargs: Any) -> Any:
        rows = real(settings, policy, *args, **kwargs)
        seen[policy] = [smp for row in rows for smp in row]
        return rows

    generate.sample = recording
    try:
        yield seen
    finally:
        generate.sample = real


def reply_indicators(finish_reasons: list[str], texts: list[str]) -> dict[str, dict[str, float]]:
    """The share of replies stopped by the token cap (finish "length") and the words per reply (whitespace
    split, as concision counts them), as eval estimates (mean, s.e.)."""
    from modpo_pipe.evaluate import Estimate

    at_cap = Estimate.of([float(reason == "length") for reason in finish_reasons])
    words = Estimate.of([float(len(text.split())) for text in texts])
    return {"at_cap": dataclasses.asdict(at_cap), "response_words": dataclasses.asdict(words)}


def with_indicators(summaries: list[dict[str, Any]], replies: dict[str, list], tokenizer: Any) -> dict[str, dict]:
    """Summaries by label, each with at_cap and response_words: its own when evaluate() wrote them, else from the
    replies recorded while it ran (decoded as evaluate decodes them for the rewards)."""
    out = {}
    for s in summaries:
        if "at_cap" not in s or "response_words" not in s:
            samples = replies.get(s["policy"])
            if samples is None:
                raise ModpoError(f"evaluate() sampled {s['label']!r} without modpo_pipe.generate.sample, and its "
                                 "summary has no at_cap and response_words: the indicators need one or the other")
            texts = [tokenizer.decode(smp.ids, skip_special_tokens=True) for smp in samples]
            s = {**s, **reply_indicators([smp.finish_reason for smp in samples], texts)}
        out[s["label"]] = s
    return out


def evaluate_all(out: Path, ref_dir: Path, size: Any, policies: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every policy and the reference in one evaluate() call; a rerun with the same policies (by content),
    prompts and sampling reads DIR/eval.json instead."""
    from modpo_pipe import demo, models, storage
    from modpo_pipe.evaluate import evaluate, read_summaries, write_summaries

    stamp = {"policies": {label: models.fingerprint(path) for label, path in policies.items()},
             "reference": models.fingerprint(str(ref_dir)), "eval_prompts": size.eval_prompts,
             "eval_samples": size.eval_samples, "seed": size.seed, "max_new_tokens": size.max_new_tokens}
    summary_path, indicators_path = out / "eval.json", out / "eval-indicators.json"
    stamp_path = out / "eval-inputs.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp and indicators_path.is_file():
        return json.loads(indicators_path.read_text())
    heldout = demo.demo_prompts(demo.EXAMPLES / "heldout.jsonl", out / "heldout-prompts.jsonl", size.eval_prompts)
    with recorded_replies() as replies:
        summaries = evaluate(demo.demo_settings(str(ref_dir), size), heldout, policies, str(ref_dir),
                             samples_per_prompt=size.eval_samples)
    write_summaries(summaries, summary_path)
    by_label = with_indicators(read_summaries([summary_path]), replies, models.load_tokenizer(str(ref_dir)))
    storage.write_atomic(indicators_path, json.dumps(by_label, indent=2) + "\n")
    storage.write_atomic(stamp_path, json.dumps(stamp, indent=2) + "\n")
    return by_label


# --- the whole run ------------------------------------------------------------------------------------------------

def run_frontier(out: Path, size: Any, betas: list[float], grpo_betas: list[float], steps: list[int],
                 budgets: list[float]) -> str:
    from benchmarks.peers.frontier_report import format_report
    from benchmarks.peers.picture import plot_curves
    from modpo_pipe import demo, storage
    from modpo_pipe.embedded import embedded_policy_dir

    out.mkdir(parents=True, exist_ok=True)
    ref_dir = Path(embedded_policy_dir()).resolve()

    def log(message: str) -> None:
        print(f"   {message}", flush=True)

    print(f"\n== modpo-pipe: the demo at beta {', '.join(f'{b:g}' for b in betas)}", flush=True)
    pipeline, stages, pipeline_toml = pipeline_side(out, ref_dir, size, betas, log)
    print(f"\n== GRPO at beta {', '.join(f'{b:g}' for b in grpo_betas)}, adapters at steps "
          f"{', '.join(map(str, steps))}", flush=True)
    grpo_policies, grpo_settings = grpo_side(out, ref_dir, size, grpo_betas, steps, log)
    policies = pipeline + grpo_policies
    print(f"\n== evaluation: {len(policies)} policies and the reference", flush=True)
    summaries = evaluate_all(out, ref_dir, size, {p["label"]: p["path"] for p in policies})
    settings = {"seed": size.seed, "size": dataclasses.asdict(size), "betas": betas, "grpo_betas": grpo_betas,
                "grpo_steps": steps, "kl_budgets": budgets, "pipeline_toml": pipeline_toml,
                "eval": {"prompts": size.eval_prompts, "samples": size.eval_samples,
                         "max_new_tokens": size.max_new_tokens, "system_message": demo.SYSTEM_MESSAGE},
                "grpo": {k: v for k, v in grpo_settings.items() if k != "trl_version"},
                "trl_version": grpo_settings.get("trl_version")}
    data = {"reference": REFERENCE, "policies": policies, "summaries": summaries, "pipeline_stages": stages,
            "settings": settings}
    storage.write_atomic(out / "frontier.json", json.dumps(data, indent=2) + "\n")
    report, _ = format_report(data, budgets)
    storage.write_atomic(out / "frontier.md", report)
    plot_curves([data], out / "frontier.png")
    return report


def combine(dirs: list[Path], out: Path, budgets: list[float]) -> str:
    """The finished seeds' frontier.json in one report and one picture."""
    from benchmarks.peers.frontier_report import format_combined
    from benchmarks.peers.picture import plot_curves
    from modpo_pipe import storage

    datas = []
    for d in dirs:
        path = d / "frontier.json"
        if not path.is_file():
            raise ModpoError(f"{path}: missing; is {d} a finished `--frontier --out` directory?")
        datas.append(json.loads(path.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    report = format_combined(datas, budgets)
    storage.write_atomic(out / "frontier.md", report)
    plot_curves(datas, out / "frontier.png")
    return report


def main(argv: list[str]) -> int:
    from modpo_pipe.demo import DemoSize

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers_grpo --frontier",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for everything the run writes.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS), help="The pipeline's betas.")
    parser.add_argument("--grpo-betas", default=",".join(f"{b:g}" for b in GRPO_BETAS), help="GRPO's KL terms.")
    parser.add_argument("--grpo-steps", default=",".join(map(str, GRPO_STEPS)),
                        help="GRPO's optimizer steps at which its adapter is saved; it trains to the last.")
    parser.add_argument("--kl-budgets", default=",".join(f"{k:g}" for k in KL_BUDGETS),
                        help="KL budgets (nats) of the hypervolumes; the outcome reads K = 5.")
    parser.add_argument("--eval-prompts", type=int, default=DemoSize().eval_prompts, help="Held-out prompts.")
    parser.add_argument("--eval-samples", type=int, default=DemoSize().eval_samples, help="Replies per prompt.")
    parser.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                        help="Finished --frontier directories (one per seed): write their joint report to --out.")
    args = parser.parse_args(argv)
    return report_or_error(lambda: frontier_or_combined(args))


def frontier_or_combined(args: argparse.Namespace) -> str:
    budgets = parse_numbers(args.kl_budgets, "--kl-budgets")
    if args.combine:
        return combine([d.resolve() for d in args.combine], args.out.resolve(), budgets)
    return run_frontier(args.out.resolve(), frontier_size(args), parse_numbers(args.betas, "--betas"),
                        parse_numbers(args.grpo_betas, "--grpo-betas"),
                        [int(s) for s in parse_numbers(args.grpo_steps, "--grpo-steps", integers=True)], budgets)


def frontier_size(args: argparse.Namespace) -> Any:
    """The demo's default size with this seed and evaluation; refused in one line where the prompt files cannot
    serve it."""
    from modpo_pipe import demo

    size = demo.DemoSize(seed=args.seed, eval_prompts=args.eval_prompts, eval_samples=args.eval_samples)
    if 0 in parse_numbers(args.betas, "--betas"):
        raise ModpoError("--betas: the pipeline's beta must be positive (its target is pi_ref exp(r / beta))")
    demo.check_size(size, args.out.resolve())
    return size
