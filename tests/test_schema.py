"""The Parquet contract between stages: writing, reading back, and refusing every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from modpo_pipe import __version__, schema
from modpo_pipe.cli import app
from modpo_pipe.errors import ModpoError

runner = CliRunner()
REWARD_NAMES = ["helpful_v2", "is_safe", "x"]


def pair_row(i: int, **changes) -> dict:
    row = {
        "pair_id": f"pair-{i}",
        "prompt_id": f"prompt-{i // 2}",
        "prompt": f"Question {i}?",
        "prompt_messages": json.dumps([{"role": "user", "content": f"Question {i}?"}]),
        "prompt_ids": [1, 2, 3 + i],
        "response_1": "yes",
        "response_2": "no way",
        "response_ids_1": [7],
        "response_ids_2": [8, 9],
        "finish_reason_1": "stop",
        "finish_reason_2": "length",
        "round": 0,
        "gen_logp_1": -1.5 if i % 2 else None,
        "gen_logp_2": -2.25,
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
            c1, c2 = schema.reward_columns(name)
            row[c1], row[c2] = float(k + i), float(k - i)
        row["ref_logp_1"], row["ref_logp_2"] = -3.0, -4.5
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema.scored_schema(names))


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
    assert back.column("gen_logp_1").null_count == 3
    assert meta["schema_version"] == schema.SCHEMA_VERSION == 1
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
    assert ds.column_names == [name for name, _ in schema.PAIR_COLUMNS]
    assert ds.to_list() == table.to_pylist()
    assert ds.features["prompt_ids"].feature.dtype == "int32"


def test_scored_round_trip_with_underscored_reward_names(tmp_path):
    sch = schema.scored_schema(REWARD_NAMES)
    assert schema.reward_names_of(sch) == REWARD_NAMES
    assert sch.names[-2:] == ["ref_logp_1", "ref_logp_2"]
    assert "reward_helpful_v2_1" in sch.names and "reward_is_safe_2" in sch.names
    table = scored_table(3)
    path = tmp_path / "scored.parquet"
    schema.write_table(table, path, schema.make_metadata("scored", rewards={"x": {"mean": 0.0, "std": 1.0}}))
    back, meta = schema.read_table(path, "scored")
    assert meta["stage"] == "scored"
    assert schema.reward_names_of(back.schema) == REWARD_NAMES
    assert back.to_pylist() == table.to_pylist()


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
    bad = pairs_table(3, {1: {"pair_id": "pair-0"}})
    error = write_error(bad, path)
    assert "row 1: duplicate pair_id 'pair-0'" in str(error)
    assert path.read_bytes() == before
    assert schema.read_table(path, "pairs")[0].num_rows == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]


def test_write_refuses_a_table_that_breaks_the_contract(tmp_path):
    path = tmp_path / "pairs.parquet"
    error = write_error(pairs_table(2, {0: {"finish_reason_1": "eos"}}), path)
    assert str(path) in str(error) and "row 0: finish_reason_1" in str(error)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ refusing


def test_missing_file(tmp_path):
    assert "no such file" in str(read_error(tmp_path / "nope.parquet"))


def test_wrong_schema_version_refused(tmp_path):
    path = write_raw(pairs_table(), tmp_path / "pairs.parquet", schema_version=2)
    message = str(read_error(path))
    assert str(path) in message
    assert "schema version 2 is not supported" in message and "reads 1" in message


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
    path = write_raw(pairs_table().drop_columns(["response_2"]), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert str(path) in message and "missing column 'response_2'" in message


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
    table = scored_table().drop_columns(["reward_is_safe_2"])
    message = str(read_error(write_raw(table, tmp_path / "s.parquet", stage="scored"), "scored"))
    assert "missing column 'reward_is_safe_2'" in message


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


def test_zero_rows_refused(tmp_path):
    empty = schema.pairs_schema().empty_table()
    path = write_raw(empty, tmp_path / "pairs.parquet")
    assert "has no rows" in str(read_error(path))
    assert "has no rows" in str(write_error(empty, tmp_path / "other.parquet"))


def test_duplicate_pair_id_names_the_row(tmp_path):
    path = write_raw(pairs_table(4, {3: {"pair_id": "pair-1"}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert str(path) in message and "row 3: duplicate pair_id 'pair-1'" in message


def test_bad_finish_reason_names_the_row(tmp_path):
    path = write_raw(pairs_table(3, {2: {"finish_reason_2": "eos"}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert "row 2: finish_reason_2 must be one of ('stop', 'length')" in message


@pytest.mark.parametrize("column", ["response_ids_1", "response_ids_2", "prompt_ids"])
def test_empty_token_ids_refused(tmp_path, column):
    path = write_raw(pairs_table(3, {1: {column: []}}), tmp_path / "pairs.parquet")
    assert f"row 1: {column} is empty" in str(read_error(path))


def test_null_in_a_required_column_names_the_row(tmp_path):
    table = pairs_table(3, {2: {"response_1": None}})
    # pyarrow will not write nulls into a non-nullable field; a foreign writer may declare it nullable.
    nullable = pa.schema([f.with_nullable(True) for f in table.schema])
    path = write_raw(table.cast(nullable), tmp_path / "pairs.parquet")
    assert "row 2: column 'response_1' is null" in str(read_error(path))
    assert "row 2: column 'response_1' is null" in str(write_error(table, tmp_path / "other.parquet"))


def test_negative_token_id_refused(tmp_path):
    path = write_raw(pairs_table(3, {1: {"response_ids_2": [4, -1]}}), tmp_path / "pairs.parquet")
    message = str(read_error(path))
    assert str(path) in message and "response_ids_2" in message and "negative" in message


def test_negative_token_id_names_the_row(tmp_path):
    # Every other row check names its row; this one only says "response_ids_2 holds negative token ids".
    # BUG (schema._check_rows): name the first offending row.
    path = write_raw(pairs_table(3, {1: {"response_ids_2": [4, -1]}}), tmp_path / "pairs.parquet")
    assert "row 1: response_ids_2" in str(read_error(path))


# --------------------------------------------------------------------------------------- token ids


def test_check_token_ids_names_the_row_with_an_out_of_vocab_id():
    table = pairs_table(4, {2: {"response_ids_1": [3, 12, 5]}})
    schema.check_token_ids(table, vocab_size=13, where="pairs.parquet")  # 12 < 13: fine
    with pytest.raises(ModpoError) as excinfo:
        schema.check_token_ids(table, vocab_size=12, where="pairs.parquet")
    assert "pairs.parquet: row 2: response_ids_1 holds id 12 >= vocab size 12" in str(excinfo.value)


def test_check_token_ids_checks_prompt_ids_too():
    table = pairs_table(3)  # prompt_ids of row i end with 3 + i
    with pytest.raises(ModpoError, match=r"row 2: prompt_ids holds id 5 >= vocab size 5"):
        schema.check_token_ids(table, vocab_size=5, where="f")
