"""eval, sweep and front on tiny models; the Pareto helpers by hand."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from modpo_pipe.cli import app
from modpo_pipe.errors import ModpoError
from modpo_pipe.evaluate import (
    Estimate,
    format_table,
    front_hypervolumes,
    non_dominated,
    paired_differences,
    read_summaries,
    weight_grid,
)

runner = CliRunner()


def test_non_dominated_by_hand():
    points = [(0.0, 1.0), (0.5, 0.5), (0.4, 0.4), (1.0, 0.0), (0.2, 0.9), (0.5, 0.5)]
    # (0.4, 0.4) is beaten by (0.5, 0.5); duplicates of a front point both stay
    assert non_dominated(points) == [0, 4, 1, 5, 3]


def test_weight_grid():
    assert weight_grid(["a", "b"], 3) == [{"a": 0.0, "b": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}]
    three = weight_grid(["a", "b", "c"], 3)
    assert {"a": 1.0, "b": 0.0, "c": 0.0} in three and all(sum(w.values()) == pytest.approx(1) for w in three)


def test_estimate():
    e = Estimate.of([1.0, 2.0, 3.0, 4.0])
    assert e.mean == 2.5 and e.sem == pytest.approx(1.2909944 / 2)


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory) -> Path:
    """generate -> score -> sweep (three weight vectors) -> eval on tiny models, through the CLI."""
    work = tmp_path_factory.mktemp("front")
    shutil.copy(tiny.prompts, work / "prompts.jsonl")
    old = Path.cwd()
    os.chdir(work)
    try:
        for args in (
            ["init", "--policy", str(tiny.policy), "--reward", f"rm={tiny.reward}",
             "--reward", f"length={tiny.reward_fn}"],
            ["generate", "prompts.jsonl", "--backend", "transformers", "--max-new-tokens", "12"],
            ["score", "pairs.parquet"],
            ["sweep", "scored.parquet", "--grid", "3", "--lr", "1e-3", "--epochs", "2", "--batch-size", "3"],
            ["eval", "prompts.jsonl", "--backend", "transformers", "--max-new-tokens", "12",
             "--policies", "lengthy=checkpoints/w-rm0.00-length1.00/final",
             "--policies", "checkpoints/w-rm1.00-length0.00/final"],
            ["front", "eval.json", "--out", "front"],
        ):
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 0, (args, result.output)
    finally:
        os.chdir(old)
    return work


def test_sweep_writes_one_policy_per_weight_vector(swept):
    dirs = sorted(p.name for p in (swept / "checkpoints").iterdir())
    assert dirs == ["w-rm0.00-length1.00", "w-rm0.50-length0.50", "w-rm1.00-length0.00"]
    info = json.loads((swept / "checkpoints" / "w-rm0.50-length0.50" / "final" / "modpo_pipe.json").read_text())
    assert info["weights"] == {"rm": 0.5, "length": 0.5}


def test_eval_summaries(swept):
    entries = read_summaries([swept / "eval.json"])
    assert [e["label"] for e in entries] == ["reference", "lengthy", "final"]
    ref = entries[0]
    assert ref["is_reference"] and ref["samples"] == 6
    # the reference sampled itself: its KL estimate is exactly 0 up to float noise
    assert abs(ref["kl_to_ref"]["mean"]) < 1e-3
    for e in entries:
        assert set(e["rewards"]) == {"rm", "length"}
        assert e["response_tokens"]["mean"] > 0
    assert entries[1]["weights"] == {"rm": 0.0, "length": 1.0}
    # Paired differences to the reference, as eval wrote them: from the per-prompt rewards, none for the reference.
    written = json.loads((swept / "eval.json").read_text())
    assert written[0]["paired_to_ref"] == {}
    for e in written[1:]:
        for name in ("rm", "length"):
            diffs = [p - r for p, r in zip(e["prompt_rewards"][name], ref["prompt_rewards"][name])]
            assert e["paired_to_ref"][name]["mean"] == pytest.approx(Estimate.of(diffs).mean)
            assert e["paired_to_ref"][name]["sem"] == pytest.approx(Estimate.of(diffs).sem)


def test_front_plot_files(swept):
    for suffix in (".png", ".svg"):
        assert (swept / f"front{suffix}").stat().st_size > 1000
    svg = (swept / "front.svg").read_text()
    assert "reference" in svg and "w_rm=" in svg  # labelled points


def test_front_refuses_unknown_axis(swept):
    result = runner.invoke(app, ["front", str(swept / "eval.json"), "--x", "nope", "--out",
                                 str(swept / "x")])
    assert result.exit_code == 1 and "nope" in result.output


@pytest.mark.slow
def test_a_policy_trained_for_concision_writes_shorter_replies_in_eval(tiny, tmp_path):
    """The one directional check of the real path, end to end: generate -> score -> train with all weight on a
    reward for short replies -> eval. The trained policy's held-out replies must be shorter than the
    reference's by more than three combined standard errors (measured: about 7 tokens -> about 2). With the
    teacher margin's sign flipped the trained policy writes 12 tokens and the test fails."""
    (tmp_path / "short.py").write_text("def short(prompts, responses):\n"
                                      "    return [-len(r) / 10.0 for r in responses]\n")
    shutil.copy(tiny.prompts, tmp_path / "prompts.jsonl")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        for args in (
            ["init", "--policy", str(tiny.policy), "--reward", f"short=py:{tmp_path / 'short.py'}:short"],
            ["generate", "prompts.jsonl", "--max-new-tokens", "12", "--samples-per-prompt", "8"],
            ["score", "pairs.parquet"],
            ["train", "scored.parquet", "--lr", "3e-3", "--epochs", "3", "--batch-size", "4", "--out", "short"],
            ["eval", "prompts.jsonl", "--max-new-tokens", "12", "--samples-per-prompt", "8",
             "--policies", "short=short/final", "--out", "short-eval.json"],
        ):
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 0, (args, result.output)
    finally:
        os.chdir(old)
    reference, trained = read_summaries([tmp_path / "short-eval.json"])
    assert (reference["label"], trained["label"]) == ("reference", "short")
    # eval's own --samples-per-prompt reached it (it once went to [generate].samples_per_prompt instead).
    prompts = sum(1 for line in tiny.prompts.read_text().splitlines() if line.strip())
    assert reference["samples"] == trained["samples"] == 8 * prompts
    ref_len, new_len = reference["response_tokens"], trained["response_tokens"]
    combined_se = (ref_len["sem"] ** 2 + new_len["sem"] ** 2) ** 0.5
    assert new_len["mean"] < ref_len["mean"] - 3 * combined_se, (ref_len, new_len)
    assert trained["rewards"]["short"]["mean"] > reference["rewards"]["short"]["mean"]


def test_front_keeps_a_dot_in_the_output_name(swept):
    """`--out plots/beta0.1` used to write plots/beta0.png (with_suffix), so `--out plots/beta0.2` overwrote it."""
    for out in ("plots/beta0.1", "plots/beta0.2", "plots/named.png"):
        result = runner.invoke(app, ["front", str(swept / "eval.json"), "--out", str(swept / out)])
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (swept / "plots").iterdir())
    assert names == ["beta0.1.png", "beta0.1.svg", "beta0.2.png", "beta0.2.svg", "named.png", "named.svg"]
    result = runner.invoke(app, ["front", str(swept / "eval.json"), "--out", ""])
    assert result.exit_code == 1 and "needs a file name" in result.output


def test_front_axes_default_to_two_different_rewards(swept):
    result = runner.invoke(app, ["front", str(swept / "eval.json"), "--x", "length", "--out", str(swept / "xy")])
    assert result.exit_code == 0, result.output
    assert "(length, rm)" in result.output  # used to be (length, length)
    result = runner.invoke(app, ["front", str(swept / "eval.json"), "--x", "rm", "--y", "rm",
                                 "--out", str(swept / "xx")])
    assert result.exit_code == 1 and "two different rewards" in result.output


def test_front_refuses_files_with_another_reference_or_a_repeated_label(swept, tmp_path):
    """A second file's reference used to be dropped unseen: its policies were drawn against the first file's
    reference, measured on other prompts. Files from one setup (prompts, sampling, seed, reference content)
    combine, however the reference's path was spelled."""
    entries = json.loads((swept / "eval.json").read_text())
    assert len({e["setup"] for e in entries}) == 1 and entries[0]["setup"]
    others = [{**e, "label": f"{e['label']}-2"} if not e["is_reference"] else {**e, "policy": e["policy"] + "/."}
              for e in entries]
    (tmp_path / "same-ref.json").write_text(json.dumps(others))
    (tmp_path / "other-ref.json").write_text(json.dumps([{**e, "setup": "other prompts"} for e in others]))
    legacy = [{k: v for k, v in e.items() if k != "setup"} for e in others]  # files written before `setup`
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    fewer = [{**e, "prompt_rewards": {k: vs[1:] for k, vs in e["prompt_rewards"].items()}} for e in legacy]
    (tmp_path / "legacy-fewer.json").write_text(json.dumps(fewer))
    for same in ("same-ref.json", "legacy.json"):
        both = read_summaries([swept / "eval.json", tmp_path / same])
        assert [e["label"] for e in both] == ["reference", "lengthy", "final", "lengthy-2", "final-2"]
    for other in ("other-ref.json", "legacy-fewer.json"):
        with pytest.raises(ModpoError, match="its reference differs from the one in"):
            read_summaries([swept / "eval.json", tmp_path / other])
    with pytest.raises(ModpoError, match="label 'lengthy' is also in"):
        read_summaries([swept / "eval.json", swept / "eval.json"])


def test_eval_refuses_no_samples_and_prompts_that_all_are_too_long(swept):
    for args, fragment in ((["--samples-per-prompt", "0"], "--samples-per-prompt must be >= 1"),
                           (["--max-prompt-tokens", "1"], "every prompt is longer than 1 tokens")):
        result = runner.invoke(app, ["eval", str(swept / "prompts.jsonl"), "--config", str(swept / "modpo.toml"),
                                     "--backend", "transformers", "--summary-out", str(swept / "never.json"), *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
        assert fragment in result.output
    assert not (swept / "never.json").exists()


def test_eval_has_no_flags_for_files_it_does_not_write():
    """eval writes one summary: --out was [generate].out (a pairs path, ignored: the summary went to
    --summary-out), and --shard-size and --on-invalid-reward were accepted and ignored. --out now names the
    summary (test_a_policy_trained_for_concision_writes_shorter_replies_in_eval writes through it)."""
    command = typer.main.get_command(app).commands["eval"]
    flags = {opt for param in command.params for opt in param.opts}
    assert not flags & {"--shard-size", "--on-invalid-reward"}
    summary_out = next(param for param in command.params if "--summary-out" in param.opts)
    assert "--out" in summary_out.opts


def test_sweep_records_each_policys_own_directory_and_refuses_colliding_labels(swept):
    policy = swept / "checkpoints" / "w-rm0.50-length0.50"
    info = json.loads((policy / "final" / "modpo_pipe.json").read_text())
    assert info["settings"]["train"]["out"] == str(policy.resolve())  # was the sweep's root
    result = runner.invoke(app, ["sweep", str(swept / "scored.parquet"), "--config", str(swept / "modpo.toml"),
                                 "--vector", "rm=0.001,length=0.999", "--vector", "rm=0.004,length=0.996",
                                 "--out", str(swept / "never")])
    assert result.exit_code == 1 and "would both train into" in result.output
    assert not (swept / "never").exists()


def test_front_x_defaults_to_the_first_reward_other_than_y(swept, tmp_path):
    """With rewards (rm, length, third), `--y rm` put the last reward on the x axis, not the first other."""
    entries = json.loads((swept / "eval.json").read_text())
    three = [{**e, "rewards": {**e["rewards"], "third": e["rewards"]["rm"]},
              "prompt_rewards": {**e["prompt_rewards"], "third": e["prompt_rewards"]["rm"]}} for e in entries]
    (tmp_path / "three.json").write_text(json.dumps(three))
    result = runner.invoke(app, ["front", str(tmp_path / "three.json"), "--y", "rm", "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "hypervolume over (length, rm)" in result.output


# ------------------------------------------------------------------------ hand-built eval files


def hand_entry(label: str, per_prompt: dict[str, list[float]], *, reference: bool = False, family: str = "",
               weights: dict[str, float] | None = None, tokens: float = 10.0) -> dict:
    """An eval summary as `eval` writes it, from per-prompt rewards (its means and s.e. follow from them)."""
    return {"label": label, "policy": f"/p/{label}", "is_reference": reference, "weights": weights, "samples": 4,
            "family": "reference" if reference else family or ("MODPO" if weights else "other"),
            "rewards": {n: {"mean": Estimate.of(v).mean, "sem": Estimate.of(v).sem} for n, v in per_prompt.items()},
            "response_tokens": {"mean": tokens, "sem": 1.0}, "kl_to_ref": {"mean": 0.0 if reference else 1.0,
                                                                         "sem": 0.1},
            "prompt_rewards": per_prompt}


def hand_file(tmp_path: Path, entries: list[dict], name: str = "eval.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("case", ["nan mean", "nan per prompt", "other prompt count", "no reference"])
def test_front_refuses_eval_files_it_cannot_be_right_about(tmp_path, case):
    """A NaN mean printed 'hypervolume 0 ± 0' and plotted; per-prompt rewards of other lengths (files of other
    prompts) printed '0 ± nan'; a file without a reference ended in a StopIteration traceback."""
    ref = hand_entry("reference", {"a": [0.0, 1.0, 0.0], "b": [0.0, 1.0, 0.0]}, reference=True)
    policy = hand_entry("p", {"a": [1.0, 2.0, 1.0], "b": [1.0, 0.0, 1.0]}, weights={"a": 1.0, "b": 0.0})
    other = hand_entry("q", {"a": [2.0, 1.0, 2.0], "b": [0.0, 0.0, 0.0]}, weights={"a": 0.5, "b": 0.5})
    if case == "nan mean":
        policy["rewards"]["a"]["mean"] = float("nan")
        files, message = [hand_file(tmp_path, [ref, policy, other])], "summary 1: rewards.a has mean nan"
    elif case == "nan per prompt":
        policy["prompt_rewards"]["b"][1] = float("nan")
        files, message = [hand_file(tmp_path, [ref, policy, other])], "'prompt_rewards' must be an object of lists"
    elif case == "other prompt count":
        other = hand_entry("q", {"a": [2.0, 1.0], "b": [0.0, 0.0]}, weights={"a": 0.5, "b": 0.5})
        files = [hand_file(tmp_path, [ref, policy]), hand_file(tmp_path, [{**ref, "setup": ""}, other], "more.json")]
        message = "'q' has per-prompt rewards \\(a\\) for 2 prompts, 'reference' \\(a, in .*eval.json\\) for 3"
    else:
        files, message = [hand_file(tmp_path, [policy, other])], "no reference entry"
    result = runner.invoke(app, ["front", *map(str, files), "--out", str(tmp_path / "front")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "front.png").exists()


def test_paired_differences_by_hand(tmp_path):
    """Per prompt, the policy's mean minus the reference's; their mean and stdev / sqrt(prompts). Prompts that move
    every policy alike (here by 10) cancel: the paired s.e. is far below the two means' s.e. combined."""
    reference = {"a": [0.0, 10.0, 0.0, 10.0], "b": [1.0, 1.0, 1.0, 1.0]}
    policy = {"a": [1.0, 12.0, 0.0, 11.0], "b": [2.0, 2.0, 2.0, 2.0]}  # differences a: 1, 2, 0, 1; b: 1, 1, 1, 1
    paired = paired_differences(policy, reference)
    # mean 1; deviations 0, 1, -1, 0: stdev sqrt(2/3), over sqrt(4)
    assert paired["a"].mean == pytest.approx(1.0) and paired["a"].sem == pytest.approx((2 / 3) ** 0.5 / 2)
    assert paired["b"].mean == pytest.approx(1.0) and paired["b"].sem == 0.0
    unpaired = (Estimate.of(policy["a"]).sem ** 2 + Estimate.of(reference["a"]).sem ** 2) ** 0.5
    assert unpaired > 7 * paired["a"].sem

    # An eval.json written before paired differences existed: computed on reading, and shown in the table.
    entries = [hand_entry("reference", reference, reference=True), hand_entry("p", policy, weights={"a": 1.0})]
    read = read_summaries([hand_file(tmp_path, entries)])
    assert read[0]["paired_to_ref"] == {}
    assert read[1]["paired_to_ref"]["a"] == pytest.approx({"mean": 1.0, "sem": (2 / 3) ** 0.5 / 2})
    table = format_table(read)
    header, _, ref_row, row, footer = table.splitlines()
    assert "Δ a" in header and "Δ b" in header
    assert "+1.000 ± 0.408" in row and "+1.000 ± 0.000" in row and "+6.000 ± 3.189" in row  # unpaired kept
    assert "over the 4 prompts" in footer
    # A file without per-prompt rewards: the means stand, the paired column says n/a.
    bare = [{k: v for k, v in e.items() if k != "prompt_rewards"} for e in entries]
    read = read_summaries([hand_file(tmp_path, bare, "bare.json")])
    assert read[1]["paired_to_ref"] == {} and "n/a" in format_table(read).splitlines()[3]


def demo_summaries(gain: list[float], tokens: tuple[float, float, float] = (10.0, 19.0, 35.0),
                   concision: tuple[float, float, float] = (0.9, 0.8, 0.5)) -> list[dict]:
    """The reference and the demo's three policies (w_positivity 0, 0.5, 1) on 4 prompts; the positivity-only
    policy is the reference plus `gain` prompt by prompt, the others fixed."""
    ref_positivity = [0.0, 0.6, -0.4, 0.2]
    ref = hand_entry("reference", {"positivity": ref_positivity, "concision": [0.5] * 4}, reference=True, tokens=32.0)
    policies = []
    positivities = ([-0.2] * 4, [0.1] * 4, [r + g for r, g in zip(ref_positivity, gain)])
    for w, positivity, c, t in zip((0.0, 0.5, 1.0), positivities, concision, tokens):
        policies.append(hand_entry(f"w_positivity={w:.1f}", {"positivity": positivity, "concision": [c] * 4},
                                   weights={"positivity": w, "concision": 1.0 - w}, tokens=t))
    return [ref, *policies]


def test_demo_criteria_from_paired_differences(tmp_path):
    from modpo_pipe import demo

    # Gains 0.3, 0.4, 0.2, 0.3: mean 0.3, stdev sqrt(0.02/3), s.e. 0.0408 -> 7.35 s.e. The two means' s.e. combined
    # (0.30) would put the same gain at 1 s.e.: the paired comparison is what sees it.
    entries = read_summaries([hand_file(tmp_path, demo_summaries([0.3, 0.4, 0.2, 0.3]))])
    first, second, third = demo.criteria(entries)
    assert [c.key for c in (first, second, third)] == ["positivity_gain", "concision_shortest", "ordered_by_weight"]
    assert first.passed and first.values["difference"] == pytest.approx(0.3)
    assert first.values["sem"] == pytest.approx((0.02 / 3) ** 0.5 / 2)
    assert first.values["standard_errors"] == pytest.approx(0.3 / ((0.02 / 3) ** 0.5 / 2))
    assert "+0.300 ± 0.041 (+7.35 s.e.)" in first.text
    assert second.passed and second.values["response_tokens"]["w_positivity=0.0"] == 10.0
    # Δ positivity: -0.3, 0.0, +0.3 (the reference's mean is 0.1); Δ concision: +0.4, +0.3, 0.0
    assert third.passed and third.values["positivity"] == pytest.approx(
        {"w_positivity=0.0": -0.3, "w_positivity=0.5": 0.0, "w_positivity=1.0": 0.3})
    assert third.values["concision"]["w_positivity=1.0"] == pytest.approx(0.0)
    printed = demo.format_criteria([first, second, third])
    assert printed.splitlines()[0] == "the demo's criteria: 3 of 3 met"
    assert all(line.startswith("  PASS  ") for line in printed.splitlines()[1:])

    # A gain of 0.1 with differences 0.3, -0.1, 0.3, -0.1: s.e. 0.115, under 1 s.e.; replies of the middle
    # policy as short as the concision-only one's; concision not falling from w 0.5 to 1.
    entries = read_summaries([hand_file(tmp_path, demo_summaries([0.3, -0.1, 0.3, -0.1], tokens=(10.0, 10.0, 35.0),
                                                                  concision=(0.9, 0.5, 0.6)), "misses.json")])
    first, second, third = demo.criteria(entries)
    assert not first.passed and "+0.100 ± 0.115 (+0.87 s.e.)" in first.text
    assert not second.passed and not third.passed
    assert demo.format_criteria([first, second, third]).count("FAIL") == 3
    # A policy below the reference: no pass whatever its s.e.
    entries = read_summaries([hand_file(tmp_path, demo_summaries([-0.3] * 4), "below.json")])
    assert not demo.criteria(entries)[0].passed


def hand_front(bounds: dict[str, list[float] | None]) -> list[dict]:
    """The reference at (0, 0); MODPO at (0.5, -0.5) and (-0.5, 0.5), each beating the reference on one reward
    only; a soup at (0.2, 0.2) on average, its `a` varying over the prompts (0, 0.4, 0, 0.4)."""
    def entry(label: str, a: list[float], b: list[float], **kwargs) -> dict:
        return {**hand_entry(label, {"a": a, "b": b}, **kwargs), "reward_bounds": bounds}

    return [entry("reference", [0.0] * 4, [0.0] * 4, reference=True),
            entry("p1", [0.5] * 4, [-0.5] * 4, weights={"a": 1.0, "b": 0.0}),
            entry("p2", [-0.5] * 4, [0.5] * 4, weights={"a": 0.0, "b": 1.0}),
            entry("soup", [0.0, 0.4, 0.0, 0.4], [0.2] * 4, family="rewarded soups")]


def test_front_hypervolumes_from_the_bounds_or_the_nadir_by_hand():
    fronts = front_hypervolumes(hand_front({"a": [-1.0, 1.0], "b": [-1.0, 1.0]}), ["a", "b"])
    assert fronts["point"] == {"a": -1.0, "b": -1.0} and set(fronts["point_kind"].values()) == {"bound"}
    # From (-1, -1): the reference's box 1 x 1; MODPO's two boxes 1.5 x 0.5 and 0.5 x 1.5, overlapping in
    # 0.5 x 0.5: 1.25, so +0.25 over the reference, where the area above the reference's means is 0.
    assert fronts["reference"] == {"hypervolume": 1.0, "sem": 0.0}
    modpo = fronts["families"]["MODPO"]
    assert modpo["hypervolume"] == pytest.approx(1.25) and modpo["gain"] == pytest.approx(0.25)
    assert modpo["gain_sem"] == 0.0 and modpo["beats_reference"] == 0.0 and modpo["policies"] == ["p1", "p2"]
    # The soup: 1.2 x 1.2 = 1.44, +0.44; above the reference's means 0.2 x 0.2. Its gain is 1.2 (1 + mean a) - 1:
    # s.e. 1.2 x the bootstrap s.e. of the mean of (0, 0.4, 0, 0.4), plug-in std 0.2 / sqrt(4): about 0.12.
    soup = fronts["families"]["rewarded soups"]
    assert soup["hypervolume"] == pytest.approx(1.44) and soup["gain"] == pytest.approx(0.44)
    assert soup["beats_reference"] == pytest.approx(0.04) and 0.10 < soup["gain_sem"] < 0.14

    # No bounds: the nadir, the worst mean on each reward, (-0.5, -0.5). There each MODPO policy is the worst on
    # one reward and adds nothing: the reference's 0.25 beats MODPO's 0; the soup's 0.7 x 0.7 = 0.49.
    fronts = front_hypervolumes(hand_front({"a": None, "b": None}), ["a", "b"])
    assert fronts["point"] == {"a": -0.5, "b": -0.5} and set(fronts["point_kind"].values()) == {"nadir"}
    assert fronts["reference"]["hypervolume"] == pytest.approx(0.25)
    assert fronts["families"]["MODPO"]["hypervolume"] == 0.0
    assert fronts["families"]["MODPO"]["gain"] == pytest.approx(-0.25)
    assert fronts["families"]["rewarded soups"]["gain"] == pytest.approx(0.24)
    # Only `a` bounded: (-1, -0.5): reference 1 x 0.5; MODPO p2's 0.5 x 1 (p1 adds nothing); soup 1.2 x 0.7.
    fronts = front_hypervolumes(hand_front({"a": [-1.0, 1.0], "b": None}), ["a", "b"])
    assert fronts["point"] == {"a": -1.0, "b": -0.5} and fronts["point_kind"] == {"a": "bound", "b": "nadir"}
    assert fronts["families"]["MODPO"]["gain"] == pytest.approx(0.0)
    assert fronts["families"]["rewarded soups"]["gain"] == pytest.approx(0.84 - 0.5)


def test_front_leads_with_the_gain_over_the_reference(tmp_path):
    """The hand-built front through `front`: the printed summary and the legend lead with front minus reference,
    from the bounds eval recorded; the area above the reference's means follows, named for what it is."""
    path = hand_file(tmp_path, hand_front({"a": [-1.0, 1.0], "b": [-1.0, 1.0]}))
    result = runner.invoke(app, ["front", str(path), "--out", str(tmp_path / "front")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("front minus reference"))
    assert "from (-1, -1), the rewards' lower bounds" in lines[head]
    assert lines[head + 1].split()[:4] == ["MODPO", "+0.25", "±", "0"]
    assert "(front 1.25 ± 0, reference 1 ± 0; 2 policies)" in lines[head + 1]
    assert lines[head + 2].split()[:3] == ["rewarded", "soups", "+0.44"]
    assert lines[head + 3].startswith("area that beats the reference on every reward")
    assert lines[head + 4].split() == ["MODPO", "0", "±", "0"]
    assert lines[head + 5].split()[:3] == ["rewarded", "soups", "0.04"]
    svg = (tmp_path / "front.svg").read_text()
    assert "MODPO: +0.25 ± 0 hypervolume over the reference (beats it on both: 0 ± 0)" in svg
    assert "reference: hypervolume 1 ± 0" in svg and "the rewards' lower bounds" in svg


def test_eval_records_declared_reward_bounds_and_refuses_scores_outside_them(swept, tmp_path):
    """A `py:` reward's `bounds` attribute goes into eval.json per reward (none for a reward model or a callable
    that declares none); a score outside its declared bounds would misplace the front's point, so it is refused."""
    written = json.loads((swept / "eval.json").read_text())
    assert all(e["reward_bounds"] == {"rm": None, "length": None} for e in written)
    (tmp_path / "bounded.py").write_text(
        "def short(prompts, responses):\n    return [-min(len(r), 50) / 50 for r in responses]\n"
        "short.bounds = (-1, 0)\n\n"
        "def wrong(prompts, responses):\n    return [1.5 for r in responses]\nwrong.bounds = [-1.0, 1.0]\n")
    base = ["eval", str(swept / "prompts.jsonl"), "--config", str(swept / "modpo.toml"), "--backend", "transformers",
            "--max-new-tokens", "4"]
    for reward, out in (("short", "bounded.json"), ("wrong", "never.json")):
        spec = f"{reward}=py:{tmp_path / 'bounded.py'}:{reward}"
        result = runner.invoke(app, [*base, "--reward", spec, "--out", str(tmp_path / out)])
        if reward == "short":
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 1 and "declares bounds (-1.0, 1.0) but scored 1.5" in result.output
    assert [e["reward_bounds"] for e in json.loads((tmp_path / "bounded.json").read_text())] == [{"short": [-1, 0]}]
    assert not (tmp_path / "never.json").exists()
