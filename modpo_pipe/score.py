"""Stage 2, pairs.parquet -> scored.parquet: every reward for every response of every group, and the reference
model's summed log-prob of each, on exactly the stored token ids. Each response is scored once, however many
pairs train forms from it."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from modpo_pipe import models, parts, reward_http, reward_stats, schema, shards, storage
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError, out_of_memory
from modpo_pipe.logprobs import batched_sequence_logps
from modpo_pipe.rewards import CallableReward, ServedReward, load_reward, reward_inputs


@dataclass
class ScoreReport:
    out: str
    pairs: int  # groups (rows) written
    rewards: dict[str, dict[str, float]]  # name -> {"mean", "std"}
    seconds: float
    dropped_invalid_reward: int = 0  # groups left with < 2 valid responses, dropped (on_invalid_reward = "drop")
    invalid_by_reward: dict[str, int] = field(default_factory=dict)  # name -> responses it made invalid
    chunks: int = 1
    resumed_parts: int = 0  # (component, chunk) parts found finished in OUT.parts/ from a killed run
    truncated_by_reward: dict[str, int] = field(default_factory=dict)  # name -> inputs cut to its max length
    dropped_invalid_responses: int = 0  # responses with a NaN/inf/None reward, dropped (on_invalid_reward = "drop")
    up_to_date: bool = False  # OUT was already scored from these pairs, rewards, reference and settings


@out_of_memory("score", "[score].batch_tokens (the reference's forward batches) or reward_batch_size")
def run_score(settings: Settings, pairs_path: Path, out: Path, progress: bool = True,
              shard: shards.Shard | None = None) -> ScoreReport:
    """Score every pair and write `out`; with `shard` (I, N), only chunks I, I+N, ... into shard file I of
    OUT.shards/ (see shards.py; `modpo-pipe merge` joins them).

    Resumable: the pairs are cut into chunks of [score].chunk_size; every reward and the reference write
    one part per chunk into OUT.parts/ (see parts.py), each model is loaded only while it has chunks left,
    and the parts are merged into `out` once all exist. A rerun after a kill recomputes no finished part.
    """
    from tqdm.auto import tqdm

    s, m = settings.score, settings.model
    if not s.rewards:
        raise ModpoError("no reward models: add a [score.rewards] table to modpo.toml or pass --reward NAME=SPEC")
    for name in s.rewards:
        schema.check_reward_name(name)
    storage.refuse_overwriting_input(out, pairs_path)
    drop_invalid = s.on_invalid_reward == "drop"
    started = time.time()
    table, pairs_meta = schema.read_table(pairs_path, "pairs")
    if shards.SHARD_KEY in pairs_meta:
        raise ModpoError(f"{pairs_path} is one shard of a pairs file: join the shards first (modpo-pipe merge "
                         f"{pairs_path.parent})")
    for key in ("policy", "tokenizer_fingerprint"):  # (a pairs file built outside the pipeline may lack them)
        schema.metadata_key(pairs_meta, key, pairs_path)
    ref_path = s.ref or pairs_meta["policy"]["path"]
    # A reference not given is the policy the pairs file names: an error about it must not blame [score].ref.
    ref_what = "[score].ref" if s.ref else f"the policy that sampled {pairs_path} (its default reference)"
    device = models.resolve_device(m.device)
    dtype = models.resolve_dtype(m.dtype, device)

    tokenizer = models.load_tokenizer(ref_path, m.trust_remote_code, what=ref_what)
    if models.tokenizer_fingerprint(tokenizer) != pairs_meta["tokenizer_fingerprint"]:
        raise ModpoError(f"{pairs_path}: was tokenised with another tokenizer than the reference {ref_path}'s; "
                         "its stored ids would mean other tokens")
    schema.check_token_ids(table, len(tokenizer), str(pairs_path))
    schema.check_context(table, models.context_length(ref_path, m.trust_remote_code), str(pairs_path),
                         f"the reference {ref_path}")

    # Callables load (import) here, and served rewards are set up, so a broken one fails before any work; models
    # load when they have work.
    callables = {name: CallableReward(name, spec) for name, spec in s.rewards.items() if spec.startswith("py:")}
    served = {name: ServedReward(name, spec, reward_http.options(s)) for name, spec in s.rewards.items()
              if reward_http.is_served(spec)}
    early = {**callables, **served}
    prompt_format = pairs_meta.get("prompt_format")  # (files written before it was recorded lack it)
    for name, reward in callables.items():
        if reward.trl and prompt_format == "mixed":
            raise ModpoError(f"{pairs_path}: its prompts mix plain text and chats, and reward {name!r} "
                             f"({reward.spec}) is a TRL reward function, which takes one or the other; generate "
                             "from prompts of one kind")
    specs = {name: {"spec": spec, "fingerprint": early[name].fingerprint() if name in early
                    else models.fingerprint(spec)} for name, spec in s.rewards.items()}
    ref_identity = {**models.identity(ref_path), "dtype": str(dtype).removeprefix("torch.")}
    sampled_with = pairs_meta["policy"].get("fingerprint")
    if not s.ref and sampled_with and Path(ref_path).is_dir() and ref_identity["fingerprint"] != sampled_with:
        # The reference defaults to the policy that sampled: another model in its place is no such reference. (A
        # local directory only: a Hub id's cached snapshot may have held only its tokenizer when generate looked.)
        raise ModpoError(f"{pairs_path}: the policy that sampled it, {ref_path}, has changed since (other contents); "
                         "give the reference explicitly ([score].ref / --ref) to score against what is there now")
    n = table.num_rows
    has_columns = schema.has_prompt_columns(table.schema)
    chunks = parts.chunk_ranges(n, s.chunk_size)
    out_file = shards.shard_path(out, shard) if shard else out
    work = parts.Parts(out_file, {"stage": "scored", "pairs": storage.sha256_file(pairs_path)[:32],
                                  "rewards": specs, "ref": ref_identity, "shard_size": s.chunk_size})
    # What decides the rows: the parts, and which responses the merge drops.
    run_key = storage.json_fingerprint({"parts": work.key, "on_invalid_reward": s.on_invalid_reward})
    if not shard and (found := parts.finished_output(out, "scored", run_key)):  # a rerun: nothing to do
        return finished_report(out, *found, time.time() - started)
    work.open()
    if shard and (meta := shards.finished(out_file, work.key)):  # a rerun of a finished shard: nothing to do
        counts = meta["score_counts"]
        return ScoreReport(str(out_file), counts["groups_out"], {}, time.time() - started,
                           counts["dropped_invalid_reward"], counts["invalid_by_reward"], len(chunks),
                           counts["resumed_parts"],
                           dropped_invalid_responses=counts.get("dropped_invalid_responses", 0))
    selected = parts.select_chunks(len(chunks), shard)  # this invocation's chunks: all, or its shard's
    n = sum(len(chunks[c]) for c in selected)
    if shard:  # from here on, the rows of the selected chunks
        table = pa.concat_tables([table.slice(0, 0)] + [table.slice(chunks[c].start, len(chunks[c]))
                                                        for c in selected])
    starts = dict(zip(selected, [0, *itertools.accumulate(len(chunks[c]) for c in selected)]))

    def column(name: str, c: int) -> list:
        """Chunk c's values of one column, as Python objects: never the whole column at once."""
        return table.column(name).slice(starts[c], len(chunks[c])).to_pylist()

    def per_response(name: str, c: int) -> list:
        """Chunk c's values of a per-response list column, flattened: response j of group g at sizes[:g] + j."""
        return [value for values in column(name, c) for value in values]

    def sizes(c: int) -> list[int]:
        return [len(ids) for ids in column("response_ids", c)]

    def as_lists(flat: list, counts: list[int], value_type: pa.DataType) -> pa.Array:
        offsets = list(itertools.accumulate(counts, initial=0))
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, value_type))

    def compute_parts(component: str, column_name: str, load, compute, what: str, allow_nan: bool) -> list[pa.Table]:
        """The parts of one component (a reward or the reference): reuse finished ones, compute the rest.
        A part is kept only when its values are finite as stored (float32); with `allow_nan`, NaN marks a
        response to drop."""
        names = {c: f"{component}-{c:05d}" for c in selected}
        done = {c: t for c, t in ((c, work.read(names[c], len(chunks[c]))) for c in selected) if t is not None}
        todo = [c for c in selected if c not in done]
        if todo:
            model = load()
            with tqdm(total=n, initial=n - sum(len(chunks[c]) for c in todo), desc=component, unit="group",
                      disable=not progress) as bar:
                for c in todo:
                    counts = sizes(c)
                    values, *truncated = compute(model, c)
                    part = pa.table({column_name: as_lists(values, counts, pa.float32()),
                                     # per group, how many of its inputs a reward model had to shorten
                                     **({"truncated": pa.array(truncated[0], pa.int32())} if truncated else {})})
                    check_part(part.select([column_name]), column("group_id", c), what, allow_nan)
                    done[c] = work.write(names[c], part)
                    bar.update(len(chunks[c]))
            del model  # free a model before loading the next one
        return [done[c] for c in selected]

    columns: dict[str, pa.ChunkedArray] = {}
    truncated_by_reward: dict[str, int] = {}
    for name, spec in s.rewards.items():
        def load_this(name=name, spec=spec):
            return early.get(name) or load_reward(name, spec, dtype=dtype, device=device,
                                                  trust_remote_code=m.trust_remote_code)

        def score_rows(reward, c):
            counts = sizes(c)
            # Every response of the chunk in one pass, once each: batches stay full.
            messages = [schema.parse_messages(m, f"{pairs_path}: group {gid!r}")
                        for m, gid in zip(column("prompt_messages", c), column("group_id", c))]
            messages = [m for m, k in zip(messages, counts) for _ in range(k)]
            fields = None
            if has_columns:  # the prompt's other fields, for TRL-style callables
                fields = [schema.parse_prompt_columns(text, f"{pairs_path}: group {gid!r}")
                          for text, gid in zip(column(schema.PROMPT_COLUMNS[0], c), column("group_id", c))]
                fields = [x for x, k in zip(fields, counts) for _ in range(k)]
            inputs = reward_inputs(messages, per_response("responses", c), columns=fields,
                                   chat={"chat": True, "text": False}.get(prompt_format),
                                   response_ids=per_response("response_ids", c))
            labels = [f"group {gid!r} response {j + 1}" for gid, k in zip(column("group_id", c), counts)
                      for j in range(k)]
            scores = reward.score(inputs, s.reward_batch_size, labels=labels, allow_invalid=drop_invalid,
                                  invalid_hint='[score].on_invalid_reward = "drop" drops such responses instead '
                                               '(counted)')
            cut = getattr(reward, "truncated", None)  # model rewards: which inputs were cut to fit
            if cut is None:
                return (scores,)
            starts_of = list(itertools.accumulate(counts, initial=0))
            return scores, [sum(int(x) for x in cut[a:b]) for a, b in zip(starts_of, starts_of[1:])]

        col = schema.reward_column(name)
        done = compute_parts(f"reward-{name}", col, load_this, score_rows, f"reward {name!r} ({spec})",
                             allow_nan=drop_invalid)
        columns[col] = pa.chunked_array([t.column(col) for t in done], pa.list_(pa.float32()))
        if name not in early:  # (a served model cuts what is too long, or refuses it, on its side)
            truncated_by_reward[name] = sum(pc.sum(t.column("truncated")).as_py() or 0 for t in done
                                            if "truncated" in t.column_names)

    def load_ref():
        return models.load_causal_lm(ref_path, dtype=dtype, device=device, trust_remote_code=m.trust_remote_code,
                                     what=ref_what)

    def ref_rows(ref, c):
        prompts = [ids for ids, k in zip(column("prompt_ids", c), sizes(c)) for _ in range(k)]
        return (batched_sequence_logps(ref, prompts, per_response("response_ids", c), tokenizer.pad_token_id,
                                       s.batch_tokens, progress=False),)

    ref_column = schema.REF_COLUMN[0]
    done = compute_parts("ref", ref_column, load_ref, ref_rows, f"reference {ref_path}", allow_nan=False)
    columns[ref_column] = pa.chunked_array([t.column(ref_column) for t in done], pa.list_(pa.float32()))

    # Responses with a non-finite reward: an error, or dropped and counted. A group keeps its other responses
    # while it has 2 to pair; one left with fewer is dropped whole.
    valid = [[True] * k for k in schema.group_sizes(table)]
    invalid_by_reward: dict[str, int] = {}  # name -> responses it made invalid
    for name in s.rewards:
        scores = columns[schema.reward_column(name)].to_pylist()
        invalid_by_reward[name] = 0
        for row, values in enumerate(scores):
            for j, value in enumerate(values):
                if not math.isfinite(value):
                    if not drop_invalid:  # parts made by an earlier run with "drop"
                        raise ModpoError(f"reward {name!r}: group {table.column('group_id')[row].as_py()!r} "
                                         f"response {j + 1} has a non-finite score (computed by an earlier run "
                                         f"with on_invalid_reward = \"drop\"; set it again, or delete {work.dir})")
                    invalid_by_reward[name] += 1
                    valid[row][j] = False
    dropped_responses = sum(k.count(False) for k in valid)
    kept_rows = [row.count(True) >= 2 for row in valid]
    kept = sum(kept_rows)
    if kept == 0 and not shard:  # (a shard may hold no groups: the merge checks that some shard does)
        raise ModpoError(f"{pairs_path}: no group keeps 2 responses without a NaN, inf or None reward "
                         f"({', '.join(f'{k}: {v}' for k, v in invalid_by_reward.items() if v)} responses); "
                         "nothing to write")

    scored = table.select(schema.pairs_schema(has_columns).names)
    for col, values in columns.items():
        scored = scored.append_column(col, values)
    scored = scored.cast(schema.scored_schema(s.rewards, has_columns))
    if dropped_responses:
        scored = schema.select_responses(scored, valid)
    stats = reward_stats.measure(scored, list(s.rewards))
    metadata = {
        **pairs_meta,
        **schema.make_metadata("scored"),
        "pairs_file": str(pairs_path),
        "ref": ref_identity,
        "rewards": {name: {**specs[name], **stats[name]} for name in s.rewards},
        "score_counts": {"groups_in": n, "groups_out": kept, "dropped_invalid_reward": n - kept,
                         "dropped_invalid_responses": dropped_responses, "invalid_by_reward": invalid_by_reward,
                         "on_invalid_reward": s.on_invalid_reward,
                         "chunks": len(chunks), "resumed_parts": work.reused,
                         "truncated_by_reward": truncated_by_reward},
    }
    if shard:
        kept_by_chunk = [sum(kept_rows[starts[c]: starts[c] + len(chunks[c])]) for c in selected]
        metadata[shards.SHARD_KEY] = shards.shard_info(shard, work.key, work.manifest, selected, kept_by_chunk,
                                                       len(chunks), time.time() - started)
    else:
        metadata[parts.RUN_KEY] = run_key
    work.write_output(scored, metadata)
    return ScoreReport(str(out_file), scored.num_rows, stats, time.time() - started, n - kept, invalid_by_reward,
                       len(chunks), work.reused, truncated_by_reward, dropped_responses)


def finished_report(out: Path, meta: dict, rows: int, seconds: float) -> ScoreReport:
    """The report of a scored file already written by this very run, from its metadata."""
    counts = meta["score_counts"]
    return ScoreReport(str(out), rows, {n: {"mean": r["mean"], "std": r["std"]} for n, r in meta["rewards"].items()},
                       seconds, counts["dropped_invalid_reward"], counts["invalid_by_reward"], counts["chunks"], 0,
                       counts.get("truncated_by_reward", {}), counts.get("dropped_invalid_responses", 0),
                       up_to_date=True)


def check_part(part: pa.Table, group_ids: list[str], what: str, allow_nan: bool) -> None:
    """Refuse a part holding a value that is not finite as stored (a float64 beyond float32's range is inf
    there), naming the group and response; with `allow_nan`, NaN is allowed: it marks a response that
    on_invalid_reward drops."""
    for col in part.column_names:
        for group_id, values in zip(group_ids, part.column(col).to_pylist()):
            for j, value in enumerate(values):
                if value is None or math.isinf(value) or (math.isnan(value) and not allow_nan):
                    raise ModpoError(f"{what}: group {group_id!r} response {j + 1}: {col} is {value} as stored "
                                     f"(float32)")
