"""Groups: N responses per prompt in one row, scored once each, paired at train time (all, disjoint,
max-min), every response forwarded once per step, a group's loss the mean over its pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ok

from modpo_pipe import schema
from modpo_pipe.train import group_pairs

# ------------------------------------------------------------------------------------------ pairing by hand


def test_all_pairs_every_i_below_j_and_drops_identical_responses():
    ids, scores = [[1], [2], [1], [3, 4]], [0.5, 2.0, 0.5, -1.0]
    assert group_pairs(ids, scores, "all") == ([(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)], 1)  # (0, 2): same ids


def test_disjoint_pairs_neighbours_as_before_groups():
    ids, scores = [[1], [2], [1], [3, 4], [5]], [0.5, 2.0, 0.5, -1.0, 9.0]
    assert group_pairs(ids, scores, "disjoint") == ([(0, 1), (2, 3)], 0)  # the odd fifth response: no pair
    assert group_pairs([[1], [1], [2], [3]], [0, 0, 1, 2], "disjoint") == ([(2, 3)], 1)


def test_max_min_keeps_the_highest_against_the_lowest():
    ids, scores = [[1], [2], [1], [3, 4]], [0.5, 2.0, 0.5, -1.0]
    assert group_pairs(ids, scores, "max-min") == ([(1, 3)], 0)
    assert group_pairs([[1], [2]], [1.0, 1.0], "max-min") == ([], 0)  # equal rewards: no extreme pair
    assert group_pairs([[1], [2], [3]], [0.0, 1.0, 1.0], "max-min") == ([(1, 0)], 0)  # first of ties


def test_n_2_gives_the_one_pair_of_before_whatever_the_pairing():
    for pairing in ("all", "disjoint"):
        assert group_pairs([[5], [6, 7]], [0.0, 1.0], pairing) == ([(0, 1)], 0)
    assert group_pairs([[5], [6, 7]], [0.0, 1.0], "max-min") == ([(1, 0)], 0)  # same pair, other orientation


# ------------------------------------------------------------------------------------------ end to end, N = 4


@pytest.fixture(scope="module")
def groups_work(tiny, tmp_path_factory) -> Path:
    """generate --samples-per-prompt 4 and score on the tiny models, counting what score computes."""
    work = tmp_path_factory.mktemp("groups")
    ok(["init", "--policy", tiny.policy, "--reward", f"rm={tiny.reward}", "--reward", f"length={tiny.reward_fn}",
        work / "modpo.toml"])
    toml = (work / "modpo.toml").read_text().replace('backend = "auto"', 'backend = "transformers"')
    toml = toml.replace("max_new_tokens = 256", "max_new_tokens = 8")
    (work / "modpo.toml").write_text(toml)
    ok(["generate", tiny.prompts, "--config", work / "modpo.toml", "--out", work / "pairs.parquet",
        "--samples-per-prompt", 4])
    return work


def test_generate_writes_every_response_of_a_prompt_in_its_row(groups_work, tiny):
    table, meta = schema.read_table(groups_work / "pairs.parquet", "pairs")
    prompts = [json.loads(line)["id"] for line in tiny.prompts.read_text().splitlines()]
    assert table.column("prompt_id").to_pylist() == prompts  # one row per prompt
    assert schema.group_sizes(table) == [4] * len(prompts)
    assert table.column("group_id").to_pylist() == [f"r0/{p}" for p in prompts]
    assert meta["sampling"]["samples_per_prompt"] == 4


def test_score_computes_each_response_once(groups_work, monkeypatch):
    import modpo_pipe.score as score_module

    calls = {"ref_rows": 0, "reward_inputs": 0}
    real_logps, real_inputs = score_module.batched_sequence_logps, score_module.reward_inputs

    def counting_logps(model, prompts, responses, *args, **kwargs):
        calls["ref_rows"] += len(responses)
        return real_logps(model, prompts, responses, *args, **kwargs)

    def counting_inputs(messages, responses, **kwargs):
        calls["reward_inputs"] += len(responses)
        return real_inputs(messages, responses, **kwargs)

    monkeypatch.setattr(score_module, "batched_sequence_logps", counting_logps)
    monkeypatch.setattr(score_module, "reward_inputs", counting_inputs)
    ok(["score", groups_work / "pairs.parquet", "--config", groups_work / "modpo.toml",
        "--out", groups_work / "scored.parquet"])
    table, _ = schema.read_table(groups_work / "scored.parquet", "scored")
    responses = sum(schema.group_sizes(table))
    assert calls["ref_rows"] == responses  # the reference: once per response
    assert calls["reward_inputs"] == 2 * responses  # two rewards, each once per response
    assert all(len(r) == 4 for r in table.column("ref_logps").to_pylist())


def test_train_forwards_each_response_once_per_step_and_averages_pairs_per_group(groups_work, tiny, monkeypatch):
    """Every micro-batch is a set of whole groups, each response one row of it; the step's loss is the mean over
    groups of the mean over each group's pairs, checked against a hand computation from the initial policy."""
    from transformers import AutoModelForCausalLM

    import modpo_pipe.train as train_module
    from modpo_pipe.logprobs import batched_sequence_logps

    scored = groups_work / "scored.parquet"
    data = train_module.load_training_groups([scored], {"rm": 1.0, "length": 1.0}, "zscore")
    assert len(data) == 6 and data.pairs == 6 * 6 - data.dropped_identical

    rows: list[int] = []
    real = train_module.sequence_logps

    def counting(model, batch, **kwargs):
        rows.append(batch.input_ids.shape[0])
        return real(model, batch, **kwargs)

    monkeypatch.setattr(train_module, "sequence_logps", counting)
    out = groups_work / "ckpt"
    ok(["train", scored, "--config", groups_work / "modpo.toml", "--out", out, "--batch-size", 2, "--grad-accum", 2,
        "--epochs", 2, "--lr", 1e-4])
    # 6 groups, 2 per micro-batch, 2 micro-batches a step: steps of 4 groups, the remainder folded in
    assert rows == [8, 8, 8] * 2  # 2 groups x 4 responses per forward; each response once per step
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["groups"] == 6

    # The first step's loss from the initial policy, by hand.
    policy = AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()
    sizes = (data.response_start[1:] - data.response_start[:-1]).tolist()
    prompts = [ids for ids, k in zip(data.prompt_ids, sizes) for _ in range(k)]
    ratio = torch.tensor(batched_sequence_logps(policy, prompts, list(data.response_ids), pad_id=1,
                                                token_budget=4096), dtype=torch.float64) - data.ref_logps.double()
    group_losses = []
    for g in range(len(data)):
        p, q = int(data.pair_start[g]), int(data.pair_start[g + 1])
        first, second = data.first[p:q], data.second[p:q]
        d = 0.1 * (ratio[first] - ratio[second]) - (data.scores[first] - data.scores[second]).double()
        group_losses.append((-F.logsigmoid(d) - F.logsigmoid(-d)).mean())
    assert metrics[0]["loss"] == pytest.approx(torch.stack(group_losses).mean().item(), rel=1e-4)
    assert metrics[0]["pairs"] == data.pairs


def test_max_min_trains_on_one_pair_per_group(groups_work):
    from modpo_pipe.train import load_training_groups

    data = load_training_groups([groups_work / "scored.parquet"], {}, "zscore", pairing="max-min")
    assert data.pairs == len(data) == 6
    for g in range(6):
        a, b = int(data.response_start[g]), int(data.response_start[g + 1])
        group = data.scores[a:b]
        assert data.scores[data.first[g]] == group.max() and data.scores[data.second[g]] == group.min()
    assert (data.teacher > 0).all()  # the selected pair: always the best above the worst


@pytest.mark.slow
def test_a_version_1_scored_file_trains_like_its_groups_of_2(groups_work, tmp_path):
    """A version-1 file (one row per pair) still trains: converted on read, it gives the same steps and losses
    as the same pairs written as version-2 groups of 2."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, meta = schema.read_table(groups_work / "scored.parquet", "scored")
    rows = table.to_pylist()
    v1_rows, v2_rows = [], []
    for row in rows:  # responses 1 and 2 of each group as one pair
        v1 = {"pair_id": row["group_id"], **{k: row[k] for k in ("prompt_id", "prompt", "prompt_messages",
                                                                 "prompt_ids", "round")}}
        for j in (1, 2):
            v1[f"response_{j}"] = row["responses"][j - 1]
            v1[f"response_ids_{j}"] = row["response_ids"][j - 1]
            v1[f"finish_reason_{j}"] = row["finish_reasons"][j - 1]
            v1[f"gen_logp_{j}"] = row["gen_logps"][j - 1]
            v1[f"ref_logp_{j}"] = row["ref_logps"][j - 1]
            for name in ("rm", "length"):
                v1[f"reward_{name}_{j}"] = row[f"reward_{name}"][j - 1]
        v1_rows.append(v1)
        v2_rows.append({k: v[:2] if isinstance(v, list) and k != "prompt_ids" else v for k, v in row.items()})
    v1_path, v2_path = tmp_path / "v1.parquet", tmp_path / "v2.parquet"
    v1_table = pa.Table.from_pylist(v1_rows, schema=schema.v1_scored_schema(["rm", "length"]))
    pq.write_table(schema.with_metadata(v1_table, {**meta, "schema_version": 1}), v1_path)
    schema.write_table(pa.Table.from_pylist(v2_rows, schema=table.schema), v2_path, meta)
    common = ["--config", groups_work / "modpo.toml", "--batch-size", 2, "--epochs", 2, "--lr", 1e-3]
    ok(["train", v1_path, *common, "--out", tmp_path / "from-v1"])
    ok(["train", v2_path, *common, "--out", tmp_path / "from-v2"])
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("from-v1", "from-v2")}
    assert [m["loss"] for m in lines["from-v1"]] == pytest.approx([m["loss"] for m in lines["from-v2"]], rel=1e-6)
    assert len(lines["from-v1"]) == 6  # 6 groups of 2, 2 a step, 2 epochs
