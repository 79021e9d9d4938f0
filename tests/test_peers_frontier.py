"""The KL frontier against GRPO (benchmarks/peers/): the comparisons on hand-computed curves (interpolation, reward at
matched KL, KL-budgeted hypervolume, the cost of a front, the outcome checks and their report), the reward-hacking
indicators, and the whole run end to end on the tiny models: the pipeline at two betas sharing one round 0,
GRPO's checkpoints (a stand-in without TRL, and a real tiny GRPOTrainer run when TRL imports), one evaluation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import peers_grpo  # noqa: E402
from benchmarks.peers import frontier, frontier_report, frontier_run, grpo  # noqa: E402
from benchmarks.peers.frontier import Point  # noqa: E402
from modpo_pipe.errors import ModpoError  # noqa: E402

# --- curves, by hand -------------------------------------------------------------------------------------------------

OURS = [Point(0.0, 0.0, 0.2, 0.03, "ref"), Point(2.0, 0.1, 0.5, 0.04, "a"), Point(6.0, 0.1, 0.7, 0.05, "b")]
THEIRS = [Point(0.0, 0.0, 0.2, 0.03, "ref"), Point(1.0, 0.1, 0.3, 0.02, "c"), Point(4.0, 0.1, 0.6, 0.04, "d"),
          Point(10.0, 0.1, 1.2, 0.05, "e")]


def test_interpolation_is_linear_between_neighbours_and_so_is_its_standard_error():
    assert frontier.interpolate(OURS, 2.0) == (0.5, 0.04)  # a measured KL: that point
    mean, sem = frontier.interpolate(OURS, 1.0)  # halfway from the reference to a
    assert mean == pytest.approx(0.35) and sem == pytest.approx(math.sqrt(0.5**2 * 0.03**2 + 0.5**2 * 0.04**2))
    assert sem == pytest.approx(0.025)
    mean, sem = frontier.interpolate(OURS, 3.0)  # a quarter of the way from a to b
    assert mean == pytest.approx(0.55) and sem == pytest.approx(0.0325)
    with pytest.raises(ModpoError, match="outside the curve's range"):
        frontier.interpolate(OURS, 7.0)


def test_rewards_are_matched_at_every_kl_either_curve_has_on_the_range_both_reach():
    matches = frontier.matched(OURS, THEIRS)
    assert [m.kl for m in matches] == [1.0, 2.0, 4.0, 6.0]  # not 0 (the shared reference), not 10 (ours stops at 6)
    kl1, kl2, kl4, kl6 = matches
    assert (kl1.ours, kl1.theirs) == (pytest.approx(0.35), 0.3) and kl1.ok
    assert kl2.theirs == pytest.approx(0.4) and kl2.theirs_sem == pytest.approx(math.sqrt(2 * (0.02 * 2 / 3) ** 2))
    assert kl4.ours == pytest.approx(0.6) and kl4.diff == pytest.approx(0.0) and kl4.ok
    # At KL 6 theirs is 2/3 * 0.6 + 1/3 * 1.2 = 0.8: ours 0.1 behind, more than one combined s.e. (0.059)
    assert kl6.theirs == pytest.approx(0.8) and kl6.diff == pytest.approx(-0.1)
    assert kl6.combined_se == pytest.approx(math.hypot(0.05, math.sqrt((2 / 3 * 0.04) ** 2 + (1 / 3 * 0.05) ** 2)))
    assert kl6.combined_se == pytest.approx(0.05907, abs=1e-5) and not kl6.ok
    assert frontier.matched(OURS[:1], THEIRS) == []  # a curve that never leaves the reference: nothing to compare


def summary(label, kl, positivity, concision, sem=0.01, prompts=4, reference=False):
    """An eval summary as evaluate() writes it, per-prompt rewards constant (bootstrap s.e. 0)."""
    return {"label": label, "policy": f"/p/{label}", "is_reference": reference, "samples": prompts,
            "rewards": {"positivity": {"mean": positivity, "sem": sem}, "concision": {"mean": concision, "sem": sem}},
            "kl_to_ref": {"mean": kl, "sem": 0.1}, "response_tokens": {"mean": 20.0, "sem": 1.0},
            "at_cap": {"mean": 0.25, "sem": 0.1}, "response_words": {"mean": 9.5, "sem": 0.5},
            "prompt_rewards": {"positivity": [positivity] * prompts, "concision": [concision] * prompts}}


def test_the_middle_objective_is_the_weighted_raw_reward_with_its_per_prompt_standard_error():
    s = summary("m", 1.0, 0.4, 0.8)
    s["prompt_rewards"] = {"positivity": [0.2, 0.4, 0.6], "concision": [0.8, 0.6, 1.0]}
    mean, sem = frontier.reward_estimate(s, frontier.OBJECTIVE, 0.5)
    assert mean == pytest.approx(0.6) and sem == pytest.approx(0.1)  # values 0.5, 0.5, 0.8: s.d. 0.173 / sqrt(3)
    assert frontier.reward_estimate(s, frontier.OBJECTIVE, 1.0) == (0.4, 0.01)  # an end: the reward's own estimate
    assert frontier.reward_estimate(s, frontier.OBJECTIVE, 0.0) == (0.8, 0.01)
    del s["prompt_rewards"]
    mean, sem = frontier.reward_estimate(s, frontier.OBJECTIVE, 0.5)
    assert mean == pytest.approx(0.6) and math.isnan(sem)


def test_hypervolume_counts_only_the_policies_within_the_kl_budget():
    ref = summary("reference", 0.0, 0.2, 0.5, reference=True)
    policies = [summary("a", 1.0, 0.4, 0.6), summary("b", 4.0, 0.3, 0.8), summary("c", 8.0, 0.6, 0.55)]
    two, five, ten = (frontier.budget_hypervolume(policies, ref, k) for k in (2.0, 5.0, 10.0))
    assert two.hypervolume == pytest.approx(0.2 * 0.1) and two.labels == ("a",)
    assert five.hypervolume == pytest.approx(0.02 + 0.03 - 0.01)  # a's box and b's, less their overlap
    assert ten.hypervolume == pytest.approx(0.1 * 0.3 + 0.1 * 0.1 + 0.2 * 0.05)  # slices x 0.2-0.3, 0.3-0.4, 0.4-0.6
    assert max(two.sem, five.sem, ten.sem) < 1e-12  # constant per-prompt rewards: every resample alike
    assert frontier.budget_hypervolume(policies, ref, 4.0).labels == ("a", "b")  # KL at the budget is within it
    none = frontier.budget_hypervolume(policies, ref, 0.5)
    assert (none.hypervolume, none.sem, none.labels) == (0.0, 0.0, ())
    policies[0]["prompt_rewards"]["positivity"] = [0.1, 0.7]  # measured on other prompts: no bootstrap
    assert math.isnan(frontier.budget_hypervolume(policies, ref, 2.0).sem)


def test_bootstrap_standard_error_of_a_budgeted_hypervolume_is_positive_with_noisy_prompts():
    ref = summary("reference", 0.0, 0.2, 0.5, reference=True)
    noisy = summary("a", 1.0, 0.4, 0.6)
    noisy["prompt_rewards"] = {"positivity": [0.1, 0.7, 0.3, 0.5], "concision": [0.6, 0.5, 0.7, 0.6]}
    volume = frontier.budget_hypervolume([noisy], ref, 2.0)
    assert volume.hypervolume == pytest.approx(0.02) and 0 < volume.sem < 0.05


def stages(runs: list[str], own=(20.0, 8.0, 4.0, 20.0)) -> dict:
    """The first run samples and scores round 0 (10 s + 5 s); the others hold copies."""
    out = {}
    for i, run in enumerate(runs):
        names = ["round-000 train", "round-001 generate", "round-001 score", "round-001 train"]
        out[run] = {"round-000 generate": {"seconds": 10.0, "shared": i > 0},
                    "round-000 score": {"seconds": 5.0, "shared": i > 0},
                    **{name: {"seconds": s, "shared": False} for name, s in zip(names, own)}}
    return out


def test_the_pipelines_front_counts_its_shared_round_zero_once():
    both = stages(["a", "b"])
    assert frontier.pipeline_seconds(both) == 15 + 2 * 52
    assert frontier.shared_seconds(both) == 15
    assert frontier.own_seconds(both, ["a"]) == frontier.own_seconds(both, ["b"]) == 52


def test_a_grpo_runs_cost_is_its_training_time_to_the_checkpoint_that_reaches_the_pipelines_kl():
    checkpoints = [(2, 20.0, 1.5), (4, 41.0, 3.9), (6, 60.0, 7.2)]
    assert frontier.matching_seconds(checkpoints, 3.0) == frontier.RunCost(41.0, 4, 3.9, 3.0, True)
    assert frontier.matching_seconds(checkpoints, 1.5) == frontier.RunCost(20.0, 2, 1.5, 1.5, True)
    assert frontier.matching_seconds(checkpoints, 10.0) == frontier.RunCost(60.0, 6, 7.2, 10.0, False)
    with pytest.raises(ModpoError, match="without checkpoints"):
        frontier.matching_seconds([], 1.0)


# --- the outcome checks and the report, on a made-up seed --------------------------------------------------------

# (KL, positivity, concision) per weight: the pipeline at beta 0.4 and 0.1; GRPO at steps 2 and 4.
PIPELINE_POINTS = {1.0: [(2.0, 0.4, 0.5), (6.0, 0.6, 0.45)], 0.0: [(2.0, 0.15, 0.7), (6.0, 0.1, 0.9)],
                   0.5: [(1.0, 0.3, 0.6), (4.0, 0.35, 0.7)]}
GRPO_POINTS = {1.0: [(4.0, 0.35, 0.45), (12.0, 0.8, 0.4)], 0.0: [(3.0, 0.1, 0.75), (9.0, 0.0, 0.95)],
               0.5: [(3.0, 0.25, 0.55), (10.0, 0.5, 0.75)]}


def made_up(seed=0, grpo_points=GRPO_POINTS) -> dict:
    """frontier.json's contents for one seed: reference at (0.2, 0.5)."""
    data = {"reference": "reference", "policies": [], "summaries": {"reference": summary("reference", 0.0, 0.2, 0.5,
                                                                                          reference=True)},
            "pipeline_stages": stages([frontier_run.run_label(b, w) for b in (0.4, 0.1) for w in (1.0, 0.0, 0.5)]),
            "settings": {"seed": seed, "betas": [0.1, 0.4], "grpo_betas": [0.0], "grpo_steps": [2, 4],
                         "eval": {"prompts": 4, "samples": 1, "max_new_tokens": 40}, "pipeline_toml": "[train]\n",
                         "grpo": {"num_generations": 4, "loss_type": "dapo"}, "trl_version": "1.16.0"}}
    for w, points in PIPELINE_POINTS.items():
        for beta, (kl, p, c) in zip((0.4, 0.1), points):
            label = f"pipeline-{frontier_run.run_label(beta, w)}"
            data["policies"].append({"label": label, "method": frontier.PIPELINE, "w": w, "beta": beta,
                                     "run": frontier_run.run_label(beta, w), "seconds": 52.0})
            data["summaries"][label] = summary(label, kl, p, c)
    for w, points in grpo_points.items():
        for step, seconds, (kl, p, c) in zip((2, 4), (25.0, 50.0), points):
            label = f"grpo-b0-w{w:.1f}-s{step:04d}"
            data["policies"].append({"label": label, "method": frontier.grpo_method(0.0), "w": w, "beta": 0.0,
                                     "step": step, "seconds": seconds})
            data["summaries"][label] = summary(label, kl, p, c)
    return data


def test_outcome_checks_on_a_made_up_seed():
    result = frontier.outcome(made_up(), "GRPO β 0")
    # Check 1: positivity-only at KL 2, 4, 6 and concision-only at 2, 3, 6 (hand-computed in the comments below)
    assert [m.kl for m in result.matches[(1.0, "positivity")]] == [2.0, 4.0, 6.0]
    assert [round(m.theirs, 4) for m in result.matches[(1.0, "positivity")]] == [0.275, 0.35, 0.4625]
    assert [round(m.ours, 4) for m in result.matches[(0.0, "concision")]] == [0.7, 0.75, 0.9]
    assert [round(m.theirs, 4) for m in result.matches[(0.0, "concision")]] == [0.6667, 0.75, 0.85]
    assert result.matched_ok
    # Check 2 at K = 5: ours (0.35, 0.7) dominates (0.3, 0.6) -> 0.15 * 0.2; GRPO's only one above: (0.25, 0.55)
    ours, theirs = result.volumes[5.0]
    assert ours.hypervolume == pytest.approx(0.03) and theirs.hypervolume == pytest.approx(0.0025)
    assert result.hv_ratio == pytest.approx(12.0) and result.hv_ok
    assert result.volumes[10.0][1].hypervolume == pytest.approx(0.3 * 0.25)  # (0.5, 0.75) at KL 10 is in
    # Check 3: 15 s of round 0 + 6 runs x 52 s against three GRPO runs to step 4 (each needs it: KL 6, 6, 4)
    assert result.pipeline_seconds == 327.0
    assert {w: (c.seconds, c.step, c.reached) for w, c in result.grpo_costs.items()} == {
        0.0: (50.0, 4, True), 0.5: (50.0, 4, True), 1.0: (50.0, 4, True)}
    assert result.grpo_seconds == 150.0 and not result.cost_ok


def test_the_report_gives_every_check_with_its_numbers_and_every_point():
    report, outcomes = frontier_report.format_report(made_up())
    assert [(o.matched_ok, o.hv_ok, o.cost_ok) for o in outcomes] == [(True, True, False)]
    assert "**Check 1, against GRPO β 0: PASS**" in report and "**Check 2, against GRPO β 0: PASS**" in report
    assert "**Check 3, against GRPO β 0: FAIL**" in report
    assert "- whole front: modpo-pipe 327 s against GRPO β 0's matching front 150 s" in report
    assert "w_positivity 0, concision: 3 of 3 KLs in 0 to 6.00 at or above GRPO" in report
    assert "ratio 12 (needs >= 1.2" in report
    assert ("| modpo-pipe | 1 | β 0.4 | 2.00 ± 0.10 | +0.400 ± 0.010 | +0.500 ± 0.010 | 20.0 ± 1.0 | 25% | "
            "9.5 ± 0.5 | 52 |") in report
    assert "| GRPO β 0 | 0.5 | step 4 | 10.00 ± 0.10 |" in report
    # GRPO at KL 6: a quarter of the way from 4 to 12, s.e. 0.01 * sqrt(0.75^2 + 0.25^2) = 0.0079
    assert "| 6.00 | +0.600 ± 0.010 | +0.462 ± 0.008 | +0.138 | 0.013 | ok |" in report
    assert "  - β 0.4: 156 s" in report and "round 0 sampled and scored once, 15 s" in report
    assert "  - w_positivity 1: 50 s to step 4 (KL 12.00; the pipeline's curve reaches 6.00)" in report
    assert "| 5 | 0.03 ± " in report and "(4 policies) | 0.0025 ± 0 (3 policies) | 12 |" in report
    assert "note:" not in report and "```toml\n[train]\n```" in report and "| `loss_type` | `\"dapo\"` |" in report


def test_a_grpo_curve_short_of_the_pipelines_kl_is_named_and_its_cost_is_a_lower_bound():
    short = {**GRPO_POINTS, 0.0: [(3.0, 0.1, 0.75), (5.0, 0.0, 0.95)]}
    report, (result,) = frontier_report.format_report(made_up(grpo_points=short))
    assert not result.grpo_costs[0.0].reached and result.grpo_costs[0.0].kl == 5.0
    assert "matching front 150 s (a lower bound)" in report
    assert "GRPO β 0's curve at w_positivity 0 ends at KL 5.00, below the pipeline's 6.00" in report


def test_the_combined_report_has_every_seeds_checks_side_by_side():
    worse = {**GRPO_POINTS, 1.0: [(4.0, 0.9, 0.45), (12.0, 0.95, 0.4)]}  # GRPO far ahead on positivity: check 1 fails
    text = frontier_report.format_combined([made_up(0), made_up(1, grpo_points=worse)])
    assert "| 1: single-objective rewards at matched KL | GRPO β 0 | PASS | FAIL |" in text
    assert "| 3: whole front costs less | GRPO β 0 | FAIL | FAIL |" in text
    assert "\n## Reward at equal KL: modpo-pipe against TRL's GRPOTrainer (seed 1)" in text
    assert "\n### Outcome checks (issue 34)" in text and "\n# " not in text.split("\n", 1)[1]


def test_reward_hacking_indicators_read_each_replys_end_and_words():
    got = frontier_run.reply_indicators(["length", "stop", "stop", "length"], ["a b c", "", "one", "x  y"])
    assert got["at_cap"]["mean"] == 0.5 and got["at_cap"]["sem"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert got["response_words"]["mean"] == 1.5
    replies = {"/p/a": [SimpleNamespace(ids=[1, 2], finish_reason="length")]}
    decoder = SimpleNamespace(decode=lambda ids, skip_special_tokens: "two words")
    plain = {k: v for k, v in summary("a", 1.0, 0.3, 0.5).items() if k not in ("at_cap", "response_words")}
    out = frontier_run.with_indicators([plain], replies, decoder)
    assert out["a"]["at_cap"]["mean"] == 1.0 and out["a"]["response_words"]["mean"] == 2.0
    own = summary("b", 1.0, 0.3, 0.5)  # evaluate() wrote them itself: those are kept
    assert frontier_run.with_indicators([own], {}, decoder)["b"]["at_cap"]["mean"] == 0.25
    with pytest.raises(ModpoError, match="without modpo_pipe.generate.sample"):
        frontier_run.with_indicators([plain], {}, decoder)


@pytest.mark.parametrize(("args", "message"), [
    (["--betas", "0,0.1"], "--betas: the pipeline's beta must be positive"),
    (["--betas", "a"], "--betas: expected comma-separated numbers"),
    (["--grpo-steps", "0,2"], "--grpo-steps: expected positive whole numbers"),
    (["--grpo-betas", "-0.1"], "--grpo-betas: expected finite, non-negative numbers"),
    (["--kl-budgets", "inf"], "--kl-budgets: expected finite, non-negative numbers"),
    (["--combine", "nowhere"], "frontier.json: missing"),
])
def test_bad_frontier_flags_are_one_line(tmp_path, capsys, args, message):
    assert peers_grpo.main(["--frontier", "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_grpo_runs_are_reused_only_with_the_same_settings_and_every_step_on_disk(tmp_path):
    stamp = {"beta": 0.0, "w": 1.0}
    record = {"stamp": stamp, "checkpoints": {"2": {"seconds": 20.0}, "4": {"seconds": 40.0}}}
    for step in (2, 4):
        grpo.checkpoint_dir(tmp_path, step).mkdir()
    assert frontier_run.reusable(record, stamp, [2, 4], tmp_path)
    assert frontier_run.reusable(record, stamp, [4], tmp_path)
    assert not frontier_run.reusable(record, stamp, [2, 4, 6], tmp_path)  # a longer run: trained again
    assert not frontier_run.reusable(record, {**stamp, "beta": 0.04}, [2], tmp_path)
    assert not frontier_run.reusable(None, stamp, [2], tmp_path)
    grpo.checkpoint_dir(tmp_path, 4).rmdir()
    assert not frontier_run.reusable(record, stamp, [2, 4], tmp_path)


def test_the_step_clock_saves_at_each_asked_step_and_stops_after_the_last(monkeypatch):
    clock = iter([0.0, 5.0, 5.0, 11.0, 14.0, 20.0, 20.0])  # start; steps end at 5, 11 (save: 3 s), 20
    monkeypatch.setattr(grpo.time, "perf_counter", lambda: next(clock))
    saved = []
    steps = grpo.TrainingClock([2.0, 3.0], lambda i, model, secs, n: saved.append((i, secs, n)), due=grpo.step_due)
    steps.start()
    assert [steps.step_end(None, n) for n in (1, 2, 3)] == [False, False, True]
    assert saved == [(0, 11.0, 2), (1, 17.0, 3)]  # the 3 s of saving at step 2 not counted


# --- end to end on the tiny models ----------------------------------------------------------------------------------

TINY = dict(train_prompts=6, eval_prompts=5, eval_samples=1, max_new_tokens=10, rounds=2, train_steps=2,
            samples_per_prompt=3)


def stand_in_grpo(calls: list):
    """GRPO without TRL: a LoRA adapter per asked step (random, distinct per step), at made-up training seconds."""

    def train(w, beta, steps, prompts, ref_dir, run_dir, demo_settings):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        calls.append((w, beta, list(steps)))
        done = {}
        for step in steps:
            torch.manual_seed(step)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(ref_dir), LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
            grpo.save_adapter(model, ref_dir, grpo.checkpoint_dir(run_dir, step),
                              {"family": f"GRPO beta {beta:g}", "weights": grpo.weights_info(w)})
            done[str(step)] = {"seconds": 10.0 * step, "replies": 8 * step}
        return {"checkpoints": done, "settings": {"num_generations": 4, "beta": beta}, "trl_version": "stand-in"}

    return train


@pytest.mark.slow
def test_frontier_end_to_end_on_tiny_models_and_a_rerun_redoes_nothing(monkeypatch, tmp_path, demo_on_tiny, capsys):
    from modpo_pipe import demo

    tiny_demo = demo.DemoSize(**TINY)
    calls: list = []
    monkeypatch.setattr(grpo, "train_grpo_steps", stand_in_grpo(calls))
    out = tmp_path / "frontier"
    report = frontier_run.run_frontier(out, tiny_demo, [0.1, 0.4], [0.0], [1, 2], [2.0, 5.0, 10.0])
    printed = capsys.readouterr().out
    # Round 0 sampled and scored once for both betas and all three weights; every run trained both rounds.
    assert printed.count("round-000 generate: starting") == 1 and printed.count("round-000 score: starting") == 1
    assert printed.count("round-000 generate: shared from") == 5 and printed.count("round-001 train: starting") == 6
    assert calls == [(w, 0.0, [1, 2]) for w in (0.0, 0.5, 1.0)]

    data = json.loads((out / "frontier.json").read_text())
    labels = [p["label"] for p in data["policies"]]
    assert labels[:6] == [f"pipeline-b{b:g}-w{w:.1f}" for b in (0.1, 0.4) for w in (0.0, 0.5, 1.0)]
    assert labels[6:] == [f"grpo-b0-w{w:.1f}-s{s:04d}" for w in (0.0, 0.5, 1.0) for s in (1, 2)]
    assert set(data["summaries"]) == {"reference", *labels}
    for s in data["summaries"].values():  # every policy evaluated on the same replies-per-prompt
        assert s["samples"] == TINY["eval_prompts"] and 0.0 <= s["at_cap"]["mean"] <= 1.0
        # replies at the cap hold max_new_tokens tokens each: their share bounds the mean length from below
        assert s["response_tokens"]["mean"] >= s["at_cap"]["mean"] * TINY["max_new_tokens"] - 1e-9
        assert (s["at_cap"]["mean"] == 1.0) == (s["response_tokens"]["mean"] == TINY["max_new_tokens"]) or \
            s["at_cap"]["mean"] < 1.0
    assert data["summaries"]["grpo-b0-w0.0-s0001"]["kl_to_ref"]["mean"] != 0.0  # the adapter changed the policy
    shared = [r["round-000 generate"]["shared"] for r in data["pipeline_stages"].values()]
    assert shared == [False] + [True] * 5
    run_dirs = [out / "pipeline" / f"beta-{b:g}" / f"w_positivity-{w:.1f}" for b in (0.1, 0.4) for w in (0.0, 0.5, 1.0)]
    assert frontier.pipeline_seconds(data["pipeline_stages"]) == pytest.approx(demo.front_seconds(run_dirs))
    assert data["settings"]["betas"] == [0.1, 0.4] and "beta = 0.1" in data["settings"]["pipeline_toml"]
    assert "**Check 1, against GRPO β 0:" in report and (out / "frontier.md").read_text() == report
    assert (out / "frontier.png").stat().st_size > 10_000

    stamps = {p: p.stat().st_mtime_ns for p in (out / "eval.json", out / "eval-indicators.json")}
    frontier_run.run_frontier(out, tiny_demo, [0.1, 0.4], [0.0], [1, 2], [2.0, 5.0, 10.0])
    again = capsys.readouterr().out
    assert "starting" not in again and "shared from" not in again and len(calls) == 3
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    frontier_run.run_frontier(out, tiny_demo, [0.1, 0.4], [0.0], [1, 2, 3], [5.0])  # a longer GRPO run
    assert calls[3:] == [(w, 0.0, [1, 2, 3]) for w in (0.0, 0.5, 1.0)]
    assert len(json.loads((out / "frontier.json").read_text())["policies"]) == 6 + 9

    combined = frontier_run.combine([out, out], tmp_path / "both", [5.0])
    assert combined.count("## Reward at equal KL") == 2 and (tmp_path / "both" / "frontier.png").is_file()


@pytest.mark.slow  # 12 s on a quiet machine, 32 s on a loaded one (TRL's import and trainer set-up)
def test_a_tiny_grpo_run_saves_adapters_at_the_asked_steps(tmp_path, tiny):
    pytest.importorskip("trl")
    pytest.importorskip("vaderSentiment")
    from modpo_pipe import models
    from modpo_pipe.demo import DemoSize, demo_settings

    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
               for p in ("Hi?", "Why is the sky blue?")]
    settings = demo_settings(str(tiny.policy), DemoSize(max_new_tokens=6))
    run_dir = tmp_path / "run"
    record = grpo.train_grpo_steps(1.0, 0.0, [1, 2], prompts, tiny.policy, run_dir, settings)
    checkpoints = record["checkpoints"]
    assert list(checkpoints) == ["1", "2"] and [c["replies"] for c in checkpoints.values()] == [8, 16]
    assert 0 < checkpoints["1"]["seconds"] <= checkpoints["2"]["seconds"]
    got = record["settings"]
    assert (got["num_generations"], got["beta"], got["loss_type"], got["max_completion_length"]) == (4, 0.0, "dapo", 6)
    assert got["lr_scheduler_type"] == "constant" and got["learning_rate"] == settings.train.lr
    assert got["reward_weights"] == [1.0, 0.0] and got["lora_r"] == settings.train.lora_r
    assert not (run_dir / "trainer").exists()
    for step in (1, 2):
        adapter = grpo.checkpoint_dir(run_dir, step)
        assert models.adapter_base(str(adapter)) == str(tiny.policy)
        assert json.loads((adapter / "modpo_pipe.json").read_text())["grpo"]["step"] == step
    # The adapter loads as a policy (merged into the reference, as evaluate() loads it) and moved it.
    import torch

    ref = models.load_causal_lm(str(tiny.policy), dtype=torch.float32, device=None)
    trained = models.load_causal_lm(str(grpo.checkpoint_dir(run_dir, 2)), dtype=torch.float32, device=None)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(ref(ids).logits, trained(ids).logits)
