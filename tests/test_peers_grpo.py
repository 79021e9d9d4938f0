"""The equal-time peer benchmark against TRL's GRPOTrainer (benchmarks/peers_grpo.py, benchmarks/peers/grpo.py),
without TRL: its budget arithmetic, its reading of the demo's timing.json / policies.json, and its report and
outcome checks from fake eval summaries. Training GRPO needs TRL and the real model: that path is smoke-run by
hand (docs/peers-grpo.md); a tiny GRPO run with TRL is in tests/test_peers_frontier.py."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import peers_grpo as peers  # noqa: E402
from benchmarks.peers import grpo  # noqa: E402
from modpo_pipe.errors import ModpoError  # noqa: E402


def test_budgets_split_the_pipelines_front_over_three_policies():
    assert peers.parse_factors("2, 1,1") == [1.0, 2.0]
    assert peers.budget_seconds(300.0, [1.0, 2.0]) == [100.0, 200.0]
    assert peers.budget_seconds(90.0, [0.5]) == [15.0]
    for bad in ("", "0", "1,-2", "a", "nan"):
        with pytest.raises(ModpoError, match="--budget-factors"):
            peers.parse_factors(bad)


def test_budget_is_met_at_the_step_end_nearest_it():
    # Steps of 8 s, budget 100 s: ends at 96 and 104 are equally near; 94 is nearer than 102 would be.
    assert not grpo.budget_due(91.0, 8.0, 100.0)  # the next end, about 99, is nearer
    assert grpo.budget_due(96.0, 8.0, 100.0)
    assert grpo.budget_due(97.0, 8.0, 100.0)  # 3 s short beats 5 s over
    assert grpo.budget_due(130.0, 8.0, 100.0)  # past it: always


def test_budget_clock_saves_at_each_budget_and_stops_after_the_last(monkeypatch):
    clock = iter([0.0,            # start
                  10.0, 10.0,     # step 1 ends (elapsed 10), no save
                  20.0, 25.0,     # step 2 ends at 20: budget 18 due; the save takes 5 s, not counted
                  35.0, 35.0,     # step 3 ends at 30 (counted): budget 36 is nearer the next end (40)
                  45.0, 45.0])    # step 4 ends at 40: budget 36 due; the last budget: stop
    monkeypatch.setattr(grpo.time, "perf_counter", lambda: next(clock))
    saved = []
    budget = grpo.TrainingClock([18.0, 36.0], lambda i, model, secs, steps: saved.append((i, secs, steps)))
    budget.start()
    assert [budget.step_end(object(), step) for step in range(1, 5)] == [False, False, False, True]
    assert saved == [(0, 20.0, 2), (1, 40.0, 4)]


def test_a_slow_first_step_meets_every_budget_it_passes(monkeypatch):
    clock = iter([0.0, 200.0, 201.0, 202.0])  # one step past both budgets: two saves at that step, then stop
    monkeypatch.setattr(grpo.time, "perf_counter", lambda: next(clock))
    saved = []
    budget = grpo.TrainingClock([20.0, 40.0], lambda i, model, secs, steps: saved.append((i, secs, steps)))
    budget.start()
    assert budget.step_end(None, 1)
    assert saved == [(0, 200.0, 1), (1, 200.0, 1)]


def write_demo(tmp_path: Path, front=60.0, policies=None) -> Path:
    demo = tmp_path / "demo"
    model = tmp_path / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    demo.mkdir(exist_ok=True)
    if front is not None:
        (demo / "timing.json").write_text(json.dumps({"front_seconds": front, "eval_seconds": 5.0}))
    if policies is None:
        policies = {peers.pipeline_label(w): str(model) for w in peers.WEIGHTS}
    (demo / "policies.json").write_text(json.dumps(policies))
    return demo


def test_reads_the_demos_timing_and_policies(tmp_path):
    front, policies = peers.read_pipeline(write_demo(tmp_path, front=123.5))
    assert front == 123.5
    assert list(policies) == ["w_positivity=0.0", "w_positivity=0.5", "w_positivity=1.0"]


@pytest.mark.parametrize("case, message", [
    ("no timing", "timing.json: missing"),
    ("bad front", "'front_seconds' must be a positive number"),
    ("no policy", "no policy for 'w_positivity=0.5'"),
    ("not a model", "is not a model directory"),
    ("not json", "policies.json: not valid JSON"),
])
def test_demo_files_fail_in_one_line(tmp_path, case, message):
    demo = write_demo(tmp_path)
    if case == "no timing":
        (demo / "timing.json").unlink()
    elif case == "bad front":
        (demo / "timing.json").write_text(json.dumps({"front_seconds": "60"}))
    elif case == "no policy":
        (demo / "policies.json").write_text(json.dumps({"w_positivity=0.0": str(tmp_path / "model")}))
    elif case == "not a model":
        write_demo(tmp_path, policies={peers.pipeline_label(w): str(tmp_path) for w in peers.WEIGHTS})
    else:
        (demo / "policies.json").write_text("{")
    with pytest.raises(ModpoError, match=message) as err:
        peers.read_pipeline(demo)
    assert "\n" not in str(err.value)


def summary(label, positivity, concision, sem=0.01, reference=False):
    """An eval summary as `modpo-pipe eval` writes it; per-prompt rewards constant, so bootstrap s.e. is 0."""
    return {"label": label, "policy": f"/p/{label}", "is_reference": reference, "weights": None, "samples": 8,
            "rewards": {"positivity": {"mean": positivity, "sem": sem}, "concision": {"mean": concision, "sem": sem}},
            "response_tokens": {"mean": 20.0, "sem": 1.0}, "kl_to_ref": {"mean": 1.0, "sem": 0.1},
            "prompt_rewards": {"positivity": [positivity] * 4, "concision": [concision] * 4}}


def entries(pipeline, grpo, factor=1.0):
    """pipeline / grpo: {w: (positivity, concision)}; the reference at (0.2, 0.5)."""
    out = {"reference": summary("reference", 0.2, 0.5, reference=True)}
    for w, (p, c) in pipeline.items():
        out[peers.eval_label("pipeline", w)] = summary(peers.eval_label("pipeline", w), p, c)
    for w, (p, c) in grpo.items():
        out[peers.eval_label("grpo", w, factor)] = summary(peers.eval_label("grpo", w, factor), p, c)
    return out


def test_outcome_passes_when_the_pipeline_is_not_worse_and_its_front_is_larger():
    # Pipeline: its ends within one combined s.e. (0.0141) of GRPO's, and a middle policy above the reference.
    result = peers.outcome(entries({0.0: (0.01, 0.90), 0.5: (0.30, 0.70), 1.0: (0.40, 0.52)},
                                   {0.0: (0.02, 0.91), 0.5: (0.25, 0.55), 1.0: (0.41, 0.45)}), 1.0)
    assert all(c.ok for c in result.comparisons) and len(result.comparisons) == 4
    # (0.3, 0.7) and (0.4, 0.52) above (0.2, 0.5): the first's box, plus the second's beyond x = 0.3
    assert result.hv_pipeline == pytest.approx(0.1 * 0.2 + 0.1 * 0.02)
    assert result.hv_grpo == pytest.approx(0.05 * 0.05)
    assert result.hv_ratio == pytest.approx(0.022 / 0.0025)
    assert result.passed


def test_outcome_fails_when_grpo_beats_an_end_by_more_than_one_combined_se():
    # A measured case: GRPO's concision policy 0.036 better on concision; our front has no volume.
    result = peers.outcome(entries({0.0: (0.024, 0.904), 0.5: (0.235, 0.728), 1.0: (0.374, 0.525)},
                                   {0.0: (0.024, 0.940), 0.5: (0.376, 0.597), 1.0: (0.418, 0.450)}), 1.0)
    worse = [(c.w, c.reward) for c in result.comparisons if not c.ok]
    assert worse == [(0.0, "concision"), (1.0, "positivity")]
    assert result.hv_pipeline > 0 and result.hv_grpo > 0  # both fronts have a policy above (0.2, 0.5) here
    assert not result.passed


def test_no_volume_on_either_side_is_a_fail_not_a_vacuous_pass():
    result = peers.outcome(entries({w: (0.1, 0.4) for w in peers.WEIGHTS}, {w: (0.1, 0.4) for w in peers.WEIGHTS}),
                           1.0)
    assert result.hv_pipeline == result.hv_grpo == 0 and math.isnan(result.hv_ratio)
    assert all(c.ok for c in result.comparisons) and not result.hv_ok and not result.passed


def test_report_has_a_table_per_factor_and_a_check_per_factor():
    both = entries({0.0: (0.01, 0.90), 0.5: (0.30, 0.70), 1.0: (0.40, 0.52)},
                   {0.0: (0.02, 0.91), 0.5: (0.25, 0.55), 1.0: (0.41, 0.45)}, factor=1.0)
    both |= {k: v for k, v in entries({}, {0.0: (0.02, 0.95), 0.5: (0.4, 0.6), 1.0: (0.5, 0.45)}, 2.0).items()
             if k != "reference"}
    runs = {"0.0": {"1": {"seconds": 20.3, "steps": 3, "replies": 24}}}
    report, outcomes = peers.format_report(both, [1.0, 2.0], 60.0, runs, "settings")
    assert [o.passed for o in outcomes] == [True, False]
    assert "## Budget factor 1: GRPO 20 s per policy" in report and "## Budget factor 2: GRPO 40 s per policy" in report
    assert "| GRPO ×2, w_positivity 0.5 | +0.400 ± 0.010 | +0.600 ± 0.010 | 20.0 | 1.00 |" in report
    assert "| modpo-pipe, w_positivity 1 | +0.400 ± 0.010 | +0.520 ± 0.010 | 20.0 | 1.00 |" in report
    assert "**Check 1** (GRPO given the pipeline's wall-clock): **PASS**" in report
    assert "**Check 2** (GRPO given 2x the pipeline's wall-clock): **FAIL**" in report
    assert "w_positivity 0, concision: modpo-pipe +0.900 vs GRPO +0.950" in report and "WORSE" in report
    assert "saved after 20 s of training, 3 steps, 24 replies" in report


def test_a_policy_at_the_reference_path_takes_the_references_summary(tmp_path):
    ref = summary("reference", 0.2, 0.5, reference=True)
    other = summary("grpo-x1-w0.0", 0.1, 0.9)
    wanted = {"pipeline-w0.0": str(tmp_path), "grpo-x1-w0.0": "/elsewhere"}
    got = peers.by_label([ref, other], wanted, str(tmp_path))
    assert got["pipeline-w0.0"]["rewards"] == ref["rewards"] and not got["pipeline-w0.0"]["is_reference"]
    assert got["grpo-x1-w0.0"] is other
    with pytest.raises(ModpoError, match="no policy 'grpo-x2-w0.0'"):
        peers.by_label([ref], {"grpo-x2-w0.0": "/elsewhere"}, str(tmp_path))


def test_rewards_read_trls_conversational_completions():
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "Hi?"}]] * 2
    completions = [[{"role": "assistant", "content": "I love this wonderful day!"}],
                   [{"role": "assistant", "content": ""}]]
    pytest.importorskip("vaderSentiment")
    positivity = grpo.positivity_reward(prompts=prompts, completions=completions, completion_ids=[[1], [2]],
                                         trainer_state=None)
    assert positivity[0] > 0.5 and positivity[1] == 0.0
    assert grpo.concision_reward(prompts=prompts, completions=completions) == [
        pytest.approx(1 - 2 * math.tanh(5 / 100)), -1.0]


def test_eval_settings_are_the_demos(tmp_path):
    from modpo_pipe import config as cfg
    from modpo_pipe.demo import REWARDS, DemoSize

    path = peers.write_eval_settings(tmp_path / "eval.toml", tmp_path / "ref model", seed=3)
    settings = cfg.load_settings(path)
    g = settings.generate
    assert (g.policy, g.seed, g.max_new_tokens, g.temperature, g.top_p, g.backend) == (
        str(tmp_path / "ref model"), 3, DemoSize().max_new_tokens, 1.0, 1.0, "transformers")
    assert settings.score.rewards == REWARDS and settings.model.dtype == "float32"


def test_a_finished_grpo_policy_is_reused_only_with_the_same_beta(tmp_path):
    (tmp_path / "grpo" / "w_positivity-0.5" / "x1").mkdir(parents=True)
    old = {"0.5": {"1": {"seconds": 80.0, "steps": 9, "replies": 72}}}  # before the beta was recorded: TRL's 0
    assert peers.grpo_done(old, 0.5, [1.0], 0.0, tmp_path)
    assert not peers.grpo_done(old, 0.5, [1.0], 0.04, tmp_path)
    new = {"0.5": {"1": {"seconds": 80.0, "steps": 9, "replies": 72, "beta": 0.04}}}
    assert peers.grpo_done(new, 0.5, [1.0], 0.04, tmp_path)
    assert not peers.grpo_done(new, 0.5, [1.0, 2.0], 0.04, tmp_path)  # no x2 saved
    assert not peers.grpo_done(new, 0.0, [1.0], 0.04, tmp_path)


def test_the_report_says_which_beta_grpo_ran_with():
    assert "beta 0 (no KL term)" in peers.settings_note([1.0], 40, 0)
    assert "beta 0.04 (a KL term to the reference; TRL's default is 0)" in peers.settings_note([1.0], 40, 0, 0.04)


@pytest.mark.parametrize("beta", ["-0.1", "nan"])
def test_a_bad_grpo_beta_is_one_line(tmp_path, beta, capsys):
    assert peers.main(["--out", str(tmp_path), "--grpo-beta", beta]) == 1
    assert "--grpo-beta must be a finite number >= 0" in capsys.readouterr().err
