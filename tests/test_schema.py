"""The Parquet contract between stages: writing, reading back, and refusing every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from modpo_pipe import __version__, schema
from modpo_pipe.cli import app
from modpo_pipe.errors import ModpoError

runner = CliRunner()
REWARD_NAMES = ["helpful_v2", "is_safe", "x"]


def pair_row(i: int, **changes) -> dict:
    """Row i of a pairs (groups) file: three responses to one prompt."""
    row = {
        "group_id": f"group-{i}",
        "prompt_id": f"prompt-{i}",
        "prompt": f"Question {i}?",
        "prompt_messages": json.dumps([{"role": "user", "content": f"Question {i}?"}]),
        "prompt_ids": [1, 2, 3 + i],
        "responses": ["yes", "no way", "maybe"],
        "response_ids": [[7], [8, 9], [10]],
        "finish_reasons": ["stop", "length", "stop"],
        "round": 0,
        "gen_logps": [-1.5 if i % 2 else None, -2.25, -0.5],
    }
    row.update(changes)
    return row


def pairs_table(n: int = 3, changes: dict[int, dict] | None = None) -> pa.Table:
    changes = changes or {}
    return pa.Table.from_pylist([pair_row(i, **changes.get(i, {})) for i in range(n)], schema=schema.pairs_schema())


def scored_table(n: int = 3, names: list[str] = REWARD_NAMES) -> pa.Table:
    rows = []
    for i in range(n):
        row = pair_row(i)
        for k, name in enumerate(names):
            row[schema.reward_column(name)] = [float(k + i), float(k - i), 0.5]
        row["ref_logps"] = [-3.0, -4.5, -1.0]
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema.scored_schema(names))


def v1_row(i: int, names: list[str] = ()) -> dict:
    row = {"pair_id": f"pair-{i}", "prompt_id": f"prompt-{i}", "prompt": f"Q{i}?",
           "prompt_messages": json.dumps([{"role": "user", "content": f"Q{i}?"}]), "prompt_ids": [1, 2 + i],
           "response_1": "yes", "response_2": "no", "response_ids_1": [7], "response_ids_2": [8, 9],
           "finish_reason_1": "stop", "finish_reason_2": "length", "round": 0,
           "gen_logp_1": None, "gen_logp_2": -2.0}
    for k, name in enumerate(names):
        row[f"reward_{name}_1"], row[f"reward_{name}_2"] = float(k + i), float(-i)
    if names:
        row["ref_logp_1"], row["ref_logp_2"] = -3.0, -4.0 - i
    return row


def write_raw(table: pa.Table, path: Path, stage: str = "pairs", **meta) -> Path:
    """Write without the contract's validation, to build files an older/buggy/foreign writer could leave."""
    pq.write_table(schema.with_metadata(table, {**schema.make_metadata(stage), **meta}), path)
    return path


def read_error(path: Path, stage: str = "pairs") -> ModpoError:
    with pytest.raises(ModpoError) as excinfo:
        schema.read_table(path, stage)
    return excinfo.value


def write_error(table: pa.Table, path: Path, stage: str = "pairs") -> ModpoError:
    with pytest.raises(ModpoError) as excinfo:
        schema.write_table(table, path, schema.make_metadata(stage))
    return excinfo.value


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(tmp_path):
    table = pairs_table(5)
    path = tmp_path / "pairs.parquet"
    schema.write_table(table, path, schema.make_metadata("pairs", seed=7, policy={"path": "p", "fingerprint": "f"}))
    back, meta = schema.read_table(path, "pairs")
    assert back.schema.remove_metadata() == schema.pairs_schema()
    assert back.to_pylist() == table.to_pylist()
    assert pa.compute.list_flatten(back.column("gen_logps")).null_count == 3  # items may be null (rows 0, 2, 4)
    assert schema.group_sizes(back) == [3] * 5
    assert meta["schema_version"] == schema.SCHEMA_VERSION == 2
    assert meta["stage"] == "pairs"
    assert meta["seed"] == 7 and meta["policy"] == {"path": "p", "fingerprint": "f"}
    assert meta["package_version"] == __version__
    assert schema.read_metadata(path) == meta


def test_plain_pyarrow_and_datasets_load_the_file_unchanged(tmp_path):
    import datasets

    table = pairs_table(4)
    path = tmp_path / "pairs.parquet"
    schema.write_table(table, path, schema.make_metadata("pairs"))
    assert pq.read_table(path).to_pylist() == table.to_pylist()
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.column_names == [name for name, _ in schema.GROUP_COLUMNS]
    assert ds.to_list() == table.to_pylist()
    assert ds.features["prompt_ids"].feature.dtype == "int32"
    frame = pq.read_table(path).to_pandas()  # pandas: one list per cell
    assert list(frame["responses"][0]) == ["yes", "no way", "maybe"]
    import duckdb  # (the dev extra installs it: a reader the contract promises to serve)
    rows = duckdb.sql(f"select group_id, len(response_ids) as n from '{path}' order by group_id").fetchall()
    assert rows == [(f"group-{i}", 3) for i in range(4)]


def test_scored_round_trip_with_underscored_reward_names(tmp_path):
    sch = schema.scored_schema(REWARD_NAMES)
    assert schema.reward_names_of(sch) == REWARD_NAMES
    assert sch.names[-1] == "ref_logps"
    assert "reward_helpful_v2" in sch.names and "reward_is_safe" in sch.names
    table = scored_table(3)
    path = tmp_path / "scored.parquet"
    schema.write_table(table, path, schema.make_metadata("scored", rewards={"x": {"mean": 0.0, "std": 1.0}}))
    back, meta = schema.read_table(path, "scored")
    assert meta["stage"] == "scored"
    assert schema.reward_names_of(back.schema) == REWARD_NAMES
    assert back.to_pylist() == table.to_pylist()


def test_select_responses_keeps_the_marked_responses_in_every_per_response_column(tmp_path):
    table = pa.concat_tables([scored_table(1), scored_table(3).slice(1)])  # chunked, one chunk sliced
    keep = [[True, True, True], [False, True, True], [True, False, False]]
    out = schema.select_responses(table, keep)
    rows, before = out.to_pylist(), table.to_pylist()
    assert [r["group_id"] for r in rows] == ["group-0", "group-1"]  # group-2 kept 1 response: no pair, dropped
    assert rows[0] == before[0]
    kept = before[1]
    for name in [*schema.PER_RESPONSE, *(schema.reward_column(n) for n in REWARD_NAMES), "ref_logps"]:
        assert rows[1][name] == kept[name][1:], name
    for name in ("group_id", "prompt", "prompt_ids", "round"):  # per-group columns untouched
        assert rows[1][name] == kept[name]
    assert rows[1]["gen_logps"] == [-2.25, -0.5] and rows[1]["response_ids"] == [[8, 9], [10]]
    assert out.schema == table.schema
    schema.write_table(out, tmp_path / "scored.parquet", schema.make_metadata("scored"))  # passes the contract
    with pytest.raises(ValueError, match="responses per row"):  # a row short
        schema.select_responses(table, keep[:2])
    # marks that do not match each row's responses are refused, not shifted between groups (same total: 9)
    with pytest.raises(ValueError, match="responses per row"):
        schema.select_responses(table, [[True, True], [True] * 4, [True] * 3])


def test_reward_name_rules():
    assert schema.check_reward_name("helpful_v2") == "helpful_v2"
    for bad in ("2fast", "a-b", "", "_x", "with space"):
        with pytest.raises(ModpoError, match="must start with a letter"):
            schema.check_reward_name(bad)


# ------------------------------------------------------------------------------------------ writing


def test_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new" / "dir" / "pairs.parquet"
    schema.write_table(pairs_table(), path, schema.make_metadata("pairs"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.parquet"]
    schema.write_table(pairs_table(2), path, schema.make_metadata("pairs"))  # replacing is fine too
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.parquet"]
    assert schema.read_table(path, "pairs")[0].num_rows == 2


def test_failed_write_keeps_the_existing_good_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    schema.write_table(pairs_table(3), path, schema.make_metadata("pairs"))
    before = path.read_bytes()
    bad = pairs_table(3, {1: {"group_id": "group-0"}})
    error = write_error(bad, path)
    assert "row 1: duplicate group_id 'group-0'" in str(error)
    assert path.read_bytes() == before
    assert schema.read_table(path, "pairs")[0].num_rows == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]


def test_write_refuses_a_table_that_breaks_the_contract(tmp_path):
    path = tmp_path / "pairs.parquet"
    error = write_error(pairs_table(2, {0: {"finish_reasons": ["eos", "stop", "stop"]}}), path)
    assert str(path) in str(error) and "row 0: finish_reasons" in str(error)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ refusing


def test_missing_file(tmp_path):
    assert "no such file" in str(read_error(tmp_path / "nope.parquet"))


def test_wrong_schema_version_refused(tmp_path):
    path = write_raw(pairs_table(), tmp_path / "pairs.parquet", schema_version=3)
    message = str(read_error(path))
    assert str(path) in message
    assert "schema version 3 is not supported" in message and "reads 1, 2" in message
    # JSON true is Python's True, which equals 1: it was read as version 1
    path = write_raw(pairs_table(), tmp_path / "pairs.parquet", schema_version=True)
    assert "schema version True is not supported" in str(read_error(path))


def test_file_without_contract_metadata_refused(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pairs_table(), path)
    assert "not a modpo-pipe file" in str(read_error(path))
    with pytest.raises(ModpoError, match="not a modpo-pipe file"):
        schema.read_metadata(path)


def test_unparseable_metadata_refused_cleanly(tmp_path):
    # BUG (schema.validate_table / read_metadata): json.loads on the metadata is unguarded, so a file whose
    # modpo_pipe metadata is not a JSON object escapes as a JSONDecodeError traceback instead of a ModpoError.
    path = tmp_path / "pairs.parquet"
    pq.write_table(pairs_table().replace_schema_metadata({schema.METADATA_KEY: b"{not json"}), path)
    assert "metadata" in str(read_error(path))


def test_missing_column(tmp_path):
    path = write_raw(pairs_table().drop_columns(["responses"]), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert str(path) in message and "missing column 'responses'" in message


def test_mistyped_column(tmp_path):
    table = pairs_table()
    index = table.schema.get_field_index("prompt_ids")
    table = table.set_column(index, pa.field("prompt_ids", pa.list_(pa.int64())),
                             table.column("prompt_ids").cast(pa.list_(pa.int64())))
    path = write_raw(table, tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert "column 'prompt_ids' has type list<" in message  # Parquet names the item "element" on read
    assert "int64>, expected list<item: int32>" in message


def test_unexpected_column(tmp_path):
    table = pairs_table().append_column("note", pa.array(["a", "b", "c"]))
    message = str(read_error(write_raw(table, tmp_path / "pairs.parquet")))
    assert "unexpected columns ['note']" in message


def test_scored_file_where_pairs_expected_and_back(tmp_path):
    scored = tmp_path / "scored.parquet"
    schema.write_table(scored_table(), scored, schema.make_metadata("scored"))
    message = str(read_error(scored, "pairs"))
    assert str(scored) in message and "is a 'scored' file, expected a 'pairs' file" in message
    pairs = tmp_path / "pairs.parquet"
    schema.write_table(pairs_table(), pairs, schema.make_metadata("pairs"))
    assert "is a 'pairs' file, expected a 'scored' file" in str(read_error(pairs, "scored"))


def test_scored_file_missing_one_reward_column(tmp_path):
    table = scored_table().drop_columns(["ref_logps"])
    message = str(read_error(write_raw(table, tmp_path / "s.parquet", stage="scored"), "scored"))
    assert "missing column 'ref_logps'" in message


def test_truncated_file_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "pairs.parquet"
    schema.write_table(pairs_table(20), path, schema.make_metadata("pairs"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = read_error(path)
    assert str(path) in str(error)
    assert "truncated or corrupt" in str(error)
    assert error.__cause__ is None and error.__suppress_context__  # raised `from None`: no pyarrow traceback
    with pytest.raises(ModpoError, match="truncated or corrupt"):
        schema.read_metadata(path)


def test_truncated_file_through_cli_inspect(tmp_path):
    path = tmp_path / "pairs.parquet"
    schema.write_table(pairs_table(20), path, schema.make_metadata("pairs"))
    path.write_bytes(path.read_bytes()[:100])
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "truncated or corrupt" in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0  # one line


def test_inspect_reads_a_good_file(tmp_path):
    path = tmp_path / "scored.parquet"
    schema.write_table(scored_table(4), path, schema.make_metadata("scored"))
    result = runner.invoke(app, ["inspect", "--json", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stage"] == "scored" and summary["rows"] == 4
    assert sorted(summary["rewards"]) == sorted(REWARD_NAMES)
    assert summary["responses_per_group"]["mean"] == 3 and summary["finish_reason"] == {"stop": 8, "length": 4}
    assert summary["identical_pairs"] == 0 and summary["ref_logp"]["min"] == -4.5
    # every pair i < j of a group: |k + i - (k - i)|, |k + i - 0.5|, |k - i - 0.5| averaged over rows and pairs
    assert summary["rewards"]["x"]["mean_abs_margin"] == pytest.approx(
        sum(abs(a - b) for i in range(4) for a, b in ((2 + i, 2 - i), (2 + i, 0.5), (2 - i, 0.5))) / 12)


def test_zero_rows_refused(tmp_path):
    empty = schema.pairs_schema().empty_table()
    path = write_raw(empty, tmp_path / "pairs.parquet")
    assert "has no rows" in str(read_error(path))
    assert "has no rows" in str(write_error(empty, tmp_path / "other.parquet"))


def test_duplicate_group_id_names_the_row(tmp_path):
    path = write_raw(pairs_table(4, {3: {"group_id": "group-1"}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert str(path) in message and "row 3: duplicate group_id 'group-1'" in message


def test_bad_finish_reason_names_the_row(tmp_path):
    path = write_raw(pairs_table(3, {2: {"finish_reasons": ["stop", "eos", "stop"]}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert "row 2: finish_reasons must each be one of ('stop', 'length')" in message


@pytest.mark.parametrize(("column", "value", "says"), [
    ("prompt_ids", [], "prompt_ids is empty"),
    ("response_ids", [[7], [], [10]], "a response's response_ids is empty"),
])
def test_empty_token_ids_refused(tmp_path, column, value, says):
    path = write_raw(pairs_table(3, {1: {column: value}}), tmp_path / "pairs.parquet")
    assert f"row 1: {says}" in str(read_error(path))


def test_null_in_a_required_column_names_the_row(tmp_path):
    table = pairs_table(3, {2: {"prompt": None}})
    # pyarrow will not write nulls into a non-nullable field; a foreign writer may declare it nullable.
    nullable = pa.schema([f.with_nullable(True) for f in table.schema])
    path = write_raw(table.cast(nullable), tmp_path / "pairs.parquet")
    assert "row 2: column 'prompt' is null" in str(read_error(path))
    assert "row 2: column 'prompt' is null" in str(write_error(table, tmp_path / "other.parquet"))


def test_null_response_in_a_group_names_the_row(tmp_path):
    path = write_raw(pairs_table(3, {1: {"responses": ["a", None, "c"]}}), tmp_path / "pairs.parquet")
    assert "row 1: responses holds a null entry" in str(read_error(path))


def test_negative_token_id_names_the_row(tmp_path):
    path = write_raw(pairs_table(3, {1: {"response_ids": [[7], [4, -1], [10]]}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert str(path) in message and "row 1: a response's response_ids holds negative token ids" in message


# --------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize(("column", "value"), [
    ("responses", ["yes", "no"]), ("finish_reasons", ["stop"] * 4), ("gen_logps", [None, None]),
])
def test_per_response_lists_must_agree_in_length(tmp_path, column, value):
    path = write_raw(pairs_table(3, {2: {column: value}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert f"row 2: {column} holds {len(value)} entries but response_ids 3" in message
    assert "\n" not in message


def test_scored_lists_must_agree_in_length(tmp_path):
    table = scored_table(2)
    rows = table.to_pylist()
    rows[1]["ref_logps"] = [-1.0, -2.0]
    path = write_raw(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "s.parquet", stage="scored")
    assert "row 1: ref_logps holds 2 entries but response_ids 3" in str(read_error(path, "scored"))


def test_a_group_needs_two_responses(tmp_path):
    one = {"responses": ["a"], "response_ids": [[7]], "finish_reasons": ["stop"], "gen_logps": [None]}
    path = write_raw(pairs_table(3, {0: one}), tmp_path / "pairs.parquet")
    assert "row 0: a group needs at least 2 responses, it holds 1" in str(read_error(path))


# --------------------------------------------------------------------------------------- version 1


def test_version_1_pairs_are_converted_on_read(tmp_path):
    """A version-1 file (one row per pair) reads as groups of 2, y1 then y2, group_id = pair_id."""
    v1 = pa.Table.from_pylist([v1_row(i) for i in range(3)], schema=schema.v1_pairs_schema())
    path = tmp_path / "pairs.parquet"
    pq.write_table(schema.with_metadata(v1, {**schema.make_metadata("pairs"), "schema_version": 1}), path)
    table, meta = schema.read_table(path, "pairs")
    assert table.schema == schema.pairs_schema()
    assert meta["schema_version"] == 2 and meta["converted_from_schema_version"] == 1
    row = table.to_pylist()[1]
    assert row["group_id"] == "pair-1" and row["responses"] == ["yes", "no"]
    assert row["response_ids"] == [[7], [8, 9]] and row["finish_reasons"] == ["stop", "length"]
    assert row["gen_logps"] == [None, -2.0]
    part, _ = schema.read_columns(path, "pairs", ["group_id", "response_ids"])
    assert part.column_names == ["group_id", "response_ids"] and part.num_rows == 3


def test_version_1_scored_files_are_converted_on_read(tmp_path):
    names = ["a", "b"]
    v1 = pa.Table.from_pylist([v1_row(i, names) for i in range(2)], schema=schema.v1_scored_schema(names))
    path = tmp_path / "scored.parquet"
    pq.write_table(schema.with_metadata(v1, {**schema.make_metadata("scored"), "schema_version": 1}), path)
    assert schema.reward_names_of(pq.read_schema(path)) == names
    table, _ = schema.read_table(path, "scored")
    row = table.to_pylist()[1]
    assert row["reward_a"] == [1.0, -1.0] and row["reward_b"] == [2.0, -1.0] and row["ref_logps"] == [-3.0, -5.0]


def test_a_broken_version_1_file_is_refused_by_the_version_1_rules(tmp_path):
    v1 = pa.Table.from_pylist([v1_row(0), {**v1_row(1), "pair_id": "pair-0"}], schema=schema.v1_pairs_schema())
    path = tmp_path / "pairs.parquet"
    pq.write_table(schema.with_metadata(v1, {**schema.make_metadata("pairs"), "schema_version": 1}), path)
    assert "row 1: duplicate pair_id 'pair-0'" in str(read_error(path))


# --------------------------------------------------------------------------------------- token ids


def test_check_token_ids_names_the_row_with_an_out_of_vocab_id():
    table = pairs_table(4, {2: {"response_ids": [[7], [3, 12, 5], [10]]}})
    schema.check_token_ids(table, vocab_size=13, where="pairs.parquet")  # 12 < 13: fine
    with pytest.raises(ModpoError) as excinfo:
        schema.check_token_ids(table, vocab_size=12, where="pairs.parquet")
    assert "pairs.parquet: row 2: response_ids holds id 12 >= vocab size 12" in str(excinfo.value)


def test_check_token_ids_checks_prompt_ids_too():
    table = pairs_table(3)  # prompt_ids of row i end with 3 + i
    with pytest.raises(ModpoError, match=r"row 2: prompt_ids holds id 5 >= vocab size 5"):
        schema.check_token_ids(table, vocab_size=5, where="f")


def test_inspect_reads_a_shard_with_no_groups(tmp_path):
    """`generate --shard I/N` writes a zero-row shard when the other shards hold every chunk; inspect used to
    end in a StatisticsError traceback on it."""
    for stage, empty in (("pairs", schema.pairs_schema().empty_table()),
                         ("scored", schema.scored_schema(REWARD_NAMES).empty_table())):
        path = write_raw(empty, tmp_path / f"{stage}.parquet", stage, shard={"index": 1, "count": 2})
        result = runner.invoke(app, ["inspect", "--json", str(path)])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["rows"] == 0 and summary["response_tokens"]["mean"] is None


def test_inspect_names_the_file_of_an_unknown_stage(tmp_path):
    for meta, fragment in (({"stage": "eval"}, "its metadata names stage 'eval'"),
                           ({"stage": None}, "its metadata names stage None")):
        path = write_raw(pairs_table(2), tmp_path / "x.parquet", **meta)
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 1 and fragment in result.stderr and str(path) in result.stderr


@pytest.mark.slow
def test_a_file_damaged_on_disk_is_refused_not_read(tmp_path):
    """Same size, other bytes (a bad disk, a bad copy): without page CRCs, pyarrow read such a file without a
    word and train trained on the changed token ids. Every stage file now carries CRCs, checked on read."""
    good = tmp_path / "scored.parquet"
    schema.write_table(scored_table(40), good, schema.make_metadata("scored"))
    data = good.read_bytes()
    expected = pq.read_table(good)
    footer = len(data) - int.from_bytes(data[-8:-4], "little") - 8
    damaged = tmp_path / "damaged.parquet"
    silent = 0
    for at in range(4, footer, 7):  # one byte of every few in the pages, each on its own copy
        flipped = bytearray(data)
        flipped[at] ^= 0x55
        damaged.write_bytes(bytes(flipped))
        try:  # what a reader without verification makes of it
            changed = not pq.read_table(damaged).equals(expected)
        except (pa.ArrowException, OSError):
            changed = False  # refused anyway
        if changed:
            silent += 1
            with pytest.raises(ModpoError, match="not a readable Parquet file"):
                schema.read_table(damaged, "scored")
            with pytest.raises(ModpoError, match="not a readable Parquet file"):
                schema.read_columns(damaged, "scored", expected.column_names)
    assert silent > 10  # the damage a plain read takes for data


def test_inspect_counts_the_non_finite_values_train_refuses(tmp_path):
    """inspect, the tool to find what is wrong with a file, ended in an AttributeError traceback on a NaN or an
    infinity (statistics.pstdev); train refuses such a file by name, and inspect now shows where."""
    table = scored_table(4)
    rewards = table.column(schema.reward_column(REWARD_NAMES[0])).to_pylist()
    rewards[0][0], rewards[1][2] = float("nan"), float("inf")
    refs = table.column("ref_logps").to_pylist()
    refs[2][1] = float("-inf")
    table = table.set_column(table.schema.get_field_index(schema.reward_column(REWARD_NAMES[0])),
                             schema.reward_column(REWARD_NAMES[0]), pa.array(rewards, pa.list_(pa.float32())))
    table = table.set_column(table.schema.get_field_index("ref_logps"), "ref_logps",
                             pa.array(refs, pa.list_(pa.float32())))
    path = write_raw(table, tmp_path / "scored.parquet", "scored")
    result = runner.invoke(app, ["inspect", "--json", str(path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    reward = summary["rewards"][REWARD_NAMES[0]]
    assert reward["non_finite"] == 2 and reward["min"] == -3 and reward["max"] == 3  # over the 10 finite values
    assert summary["ref_logp"]["non_finite"] == 1 and summary["ref_logp"]["min"] == -4.5
    assert "non_finite" not in summary["rewards"][REWARD_NAMES[1]]
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout  # strict JSON: margins over finite pairs
