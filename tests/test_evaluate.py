"""eval, sweep and front on tiny models; the Pareto helpers by hand."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modpo_pipe.cli import app
from modpo_pipe.evaluate import Estimate, non_dominated, read_summaries, weight_grid

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


def test_front_plot_files(swept):
    for suffix in (".png", ".svg"):
        assert (swept / f"front{suffix}").stat().st_size > 1000
    svg = (swept / "front.svg").read_text()
    assert "reference" in svg and "w_rm=" in svg  # labelled points


def test_front_refuses_unknown_axis(swept):
    result = runner.invoke(app, ["front", str(swept / "eval.json"), "--x", "nope", "--out",
                                 str(swept / "x")])
    assert result.exit_code == 1 and "nope" in result.output


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
             "--policies", "short=short/final", "--out", "eval.json"],
        ):
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 0, (args, result.output)
    finally:
        os.chdir(old)
    reference, trained = read_summaries([tmp_path / "eval.json"])
    assert (reference["label"], trained["label"]) == ("reference", "short")
    # eval's own --samples-per-prompt reached it (it once went to [generate].samples_per_prompt instead).
    prompts = sum(1 for line in tiny.prompts.read_text().splitlines() if line.strip())
    assert reference["samples"] == trained["samples"] == 8 * prompts
    ref_len, new_len = reference["response_tokens"], trained["response_tokens"]
    combined_se = (ref_len["sem"] ** 2 + new_len["sem"] ** 2) ** 0.5
    assert new_len["mean"] < ref_len["mean"] - 3 * combined_se, (ref_len, new_len)
    assert trained["rewards"]["short"]["mean"] > reference["rewards"]["short"]["mean"]
