"""Smoke test of the benchmark (the package benchmarks/run/, `python -m benchmarks.run`): the --quick code path on
a tiny model runs every variant and reports every row. Timings are never asserted: they depend on the machine."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Imported, not importorskip'd: a benchmark that no longer imports must fail here, not skip.
from benchmarks.run import cli, variants, workload  # noqa: E402


@pytest.fixture(autouse=True)
def packing_restored(monkeypatch):
    """The benchmark's variants set logprobs.PACK_SHARED_PROMPTS for the process they run in (a process of their
    own, but this process under --no-isolate): the ablation without packing left it off for every later test."""
    from modpo_pipe import logprobs

    monkeypatch.setattr(logprobs, "PACK_SHARED_PROMPTS", logprobs.PACK_SHARED_PROMPTS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    workload.build_workload(workload.SIZES["tiny"], root)
    return root


@pytest.mark.slow
def test_benchmark_runs_every_variant_and_reports(workdir, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert cli.main(["--size", "tiny", "--no-isolate", "--workdir", str(workdir), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    expected = set(variants.SECTIONS["train"] + variants.SECTIONS["score"] + variants.SECTIONS["generate"]
                   + variants.EXTRAS["train"] + variants.EXTRAS["score"])
    assert expected <= set(results["runs"])
    for name, runs in results["runs"].items():
        assert all("error" not in r for r in runs), (name, runs)
    metrics = {row["metric"] for row in results["rows"]}
    for metric in ("full FT: pairs/s", "LoRA: pairs/s", "LoRA: peak RSS (loop)",
                   "pairs/s (ref log-probs + 2 reward models)", "real-token share, reference log-probs",
                   "tokens/s, transformers backend", "full FT FLOP/s (6*params*tokens computed) / fp32 matmul FLOP/s"):
        assert metric in metrics
        assert metric in table
    rows = {row["metric"]: row for row in results["rows"]}
    assert rows["full FT: pairs/s"]["ratio"] > 0
    assert 0 < float(rows["real-token share, reference log-probs"]["ours"]) <= 1


@pytest.mark.slow
def test_child_process_reports_json(workdir):
    """The isolated form: one variant in a child process, its result read back as JSON."""
    result = variants.spawn("score-base", workdir / "workload.json", isolate=True)
    assert "error" not in result, result
    assert result["pairs"] == workload.SIZES["tiny"].score_pairs
    assert result["reward_slots"] >= result["reward_tokens"] > 0


@pytest.mark.slow
def test_groups_benchmark_trains_both_arms_on_the_same_responses(tmp_path, capsys):
    """benchmarks/groups.py (what groups buy: pair terms per second) on the tiny shape: per step, N = 4 trains 6
    pair terms a group and N = 2 one, on the same number of responses. Timings are not asserted."""
    from benchmarks import groups
    out = tmp_path / "groups.json"
    assert groups.main(["--size", "tiny", "--batch", "2", "--steps", "3", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    n4, n2 = result["runs"]["4"][0], result["runs"]["2"][0]
    assert n4["steps"] == n2["steps"] == 3  # the second epoch's (the first warms up)
    assert n4["pairs"] == 3 * 2 * 6 and n2["pairs"] == 3 * 4 * 1  # 3 steps of 2 groups of 4, or 4 groups of 2
    assert result["ratio_n4_over_n2"] > 0
    assert "ratio N = 4 / N = 2" in capsys.readouterr().out
