"""Stage 2, pairs.parquet -> scored.parquet: every reward for every response of every group, and the reference
model's summed log-prob of each, on exactly the stored token ids. Each response is scored once, however many
pairs train forms from it."""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from modpo_pipe import models, parts, reward_http, reward_stats, schema, shards, storage
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError, out_of_memory
from modpo_pipe.logprobs import batched_sequence_logps
from modpo_pipe.rewards import CallableReward, ServedReward, load_reward, reward_inputs

if TYPE_CHECKING:
    import torch


@dataclass
class ScoreReport:
    out: str
    groups: int  # groups (rows) written
    rewards: dict[str, dict[str, float]]  # name -> {"mean", "std"}
    seconds: float
    dropped_invalid_groups: int = 0  # groups left with < 2 valid responses, dropped (on_invalid_reward = "drop")
    invalid_by_reward: dict[str, int] = field(default_factory=dict)  # name -> responses it made invalid
    chunks: int = 1
    resumed_parts: int = 0  # (component, chunk) parts found finished in OUT.parts/ from a killed run
    truncated_by_reward: dict[str, int] = field(default_factory=dict)  # name -> inputs cut to its max length
    dropped_invalid_responses: int = 0  # responses with a NaN/inf/None reward, dropped (on_invalid_reward = "drop")
    up_to_date: bool = False  # OUT was already scored from these pairs, rewards, reference and settings


@dataclass
class Reference:
    """The model whose log-probs train measures every response from."""

    path: str
    what: str  # how errors name it
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    attention: str | None  # transformers' attn_implementation ([model].attention); None: the library's default


@dataclass
class ChunkedPairs:
    """The pairs this invocation scores, cut into chunks (all of them, or one shard's), read a chunk at a time."""

    table: pa.Table  # the selected chunks' rows, in order
    chunks: list[range]  # every chunk of the whole file
    selected: list[int]  # the chunks scored here
    starts: dict[int, int]  # chunk -> its first row in `table`

    @classmethod
    def select(cls, table: pa.Table, chunks: list[range], shard: shards.Shard | None) -> ChunkedPairs:
        selected = parts.select_chunks(len(chunks), shard)
        if shard:  # from here on, the rows of the selected chunks
            table = pa.concat_tables([table.slice(0, 0)] + [table.slice(chunks[c].start, len(chunks[c]))
                                                            for c in selected])
        starts = dict(zip(selected, [0, *itertools.accumulate(len(chunks[c]) for c in selected)]))
        return cls(table, chunks, selected, starts)

    @property
    def rows(self) -> int:
        return sum(len(self.chunks[c]) for c in self.selected)

    def column(self, name: str, c: int) -> list:
        """Chunk c's values of one column, as Python objects: never the whole column at once."""
        return self.table.column(name).slice(self.starts[c], len(self.chunks[c])).to_pylist()

    def per_response(self, name: str, c: int) -> list:
        """Chunk c's values of a per-response list column, flattened: response j of group g at sizes[:g] + j."""
        return [value for values in self.column(name, c) for value in values]

    def sizes(self, c: int) -> list[int]:
        return [len(ids) for ids in self.column("response_ids", c)]


@out_of_memory("score", "[score].batch_tokens (the reference's forward batches) or reward_batch_size")
def run_score(settings: Settings, pairs_path: Path, out: Path, progress: bool = True,
              shard: shards.Shard | None = None) -> ScoreReport:
    """Score every pair and write `out`; with `shard` (I, N), only chunks I, I+N, ... into shard file I of
    OUT.shards/ (see shards.py; `modpo-pipe merge` joins them).

    Resumable: the pairs are cut into chunks of [score].chunk_size; every reward and the reference write
    one part per chunk into OUT.parts/ (see parts.py), each model is loaded only while it has chunks left,
    and the parts are merged into `out` once all exist. A rerun after a kill recomputes no finished part.
    """
    s = settings.score
    if not s.rewards:
        raise ModpoError("no reward models: add a [score.rewards] table to modpo.toml or pass --reward NAME=SPEC")
    for name in s.rewards:
        schema.check_reward_name(name)
    storage.refuse_overwriting_input(out, pairs_path)
    started = time.time()
    table, pairs_meta = read_pairs(pairs_path)
    ref = check_reference(settings, pairs_path, table, pairs_meta)
    early = early_rewards(settings, pairs_path, pairs_meta.get("prompt_format"))
    specs = {name: {"spec": spec, "fingerprint": early[name].fingerprint() if name in early
                    else models.fingerprint(spec)} for name, spec in s.rewards.items()}
    ref_identity = {**models.identity(ref.path), "dtype": str(ref.dtype).removeprefix("torch.")}
    check_sampling_policy(settings, pairs_path, pairs_meta, ref_identity)
    chunks = parts.chunk_ranges(table.num_rows, s.chunk_size)
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
        return ScoreReport(out=str(out_file), groups=counts["groups_out"], rewards={},
                           seconds=time.time() - started, dropped_invalid_groups=counts["dropped_invalid_reward"],
                           invalid_by_reward=counts["invalid_by_reward"], chunks=len(chunks),
                           resumed_parts=counts["resumed_parts"],
                           dropped_invalid_responses=counts.get("dropped_invalid_responses", 0))
    pairs = ChunkedPairs.select(table, chunks, shard)
    columns, truncated_by_reward = reward_columns(settings, pairs_path, pairs, work, ref, early,
                                                  pairs_meta.get("prompt_format"), progress)
    ref_column = schema.REF_COLUMN[0]
    done = compute_parts(work, pairs, "ref", ref_column, functools.partial(load_reference, settings, ref),
                         functools.partial(reference_logps, s.batch_tokens, ref.tokenizer.pad_token_id),
                         f"reference {ref.path}", allow_nan=False, progress=progress)
    columns[ref_column] = pa.chunked_array([t.column(ref_column) for t in done], pa.list_(pa.float32()))
    return write_scored(settings, pairs_path, pairs, columns, work, shard, {
        **pairs_meta, **schema.make_metadata("scored"), "pairs_file": str(pairs_path), "ref": ref_identity,
        "rewards": specs}, run_key, truncated_by_reward, started)


def read_pairs(pairs_path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """A whole pairs file (not one shard of one) and its metadata, with what score reads from it."""
    table, pairs_meta = schema.read_table(pairs_path, "pairs")
    if shards.SHARD_KEY in pairs_meta:
        raise ModpoError(f"{pairs_path} is one shard of a pairs file: join the shards first (modpo-pipe merge "
                         f"{pairs_path.parent})")
    for key in ("policy", "tokenizer_fingerprint"):  # (a pairs file built outside the pipeline may lack them)
        schema.metadata_key(pairs_meta, key, pairs_path)
    return table, pairs_meta


def check_reference(settings: Settings, pairs_path: Path, table: pa.Table, pairs_meta: dict[str, Any]) -> Reference:
    """The reference ([score].ref, else the policy that sampled), with a tokenizer that gives the stored ids
    their meaning and a context window that holds every group."""
    s, m = settings.score, settings.model
    ref_path = s.ref or pairs_meta["policy"]["path"]
    # A reference not given is the policy the pairs file names: an error about it must not blame [score].ref.
    ref_what = "[score].ref" if s.ref else f"the policy that sampled {pairs_path} (its default reference)"
    device = models.resolve_device(m.device)
    dtype = models.resolve_dtype(m.dtype, device)
    attention = models.attention_implementation(m.attention, device)  # flex off CUDA: refused before any work
    tokenizer = models.load_tokenizer(ref_path, m.trust_remote_code, what=ref_what)
    if models.tokenizer_fingerprint(tokenizer) != pairs_meta["tokenizer_fingerprint"]:
        raise ModpoError(f"{pairs_path}: was tokenised with another tokenizer than the reference {ref_path}'s; "
                         "its stored ids would mean other tokens")
    schema.check_token_ids(table, len(tokenizer), str(pairs_path))
    schema.check_context(table, models.context_length(ref_path, m.trust_remote_code), str(pairs_path),
                         f"the reference {ref_path}")
    return Reference(path=ref_path, what=ref_what, device=device, dtype=dtype, tokenizer=tokenizer,
                     attention=attention)


def early_rewards(settings: Settings, pairs_path: Path, prompt_format: str | None) -> dict[str, Any]:
    """Callables load (import) here, and served rewards are set up, so a broken one fails before any work; models
    load when they have work."""
    s = settings.score
    callables = {name: CallableReward(name, spec) for name, spec in s.rewards.items() if spec.startswith("py:")}
    served = {name: ServedReward(name, spec, reward_http.options(s)) for name, spec in s.rewards.items()
              if reward_http.is_served(spec)}
    for name, reward in callables.items():  # (prompt_format: files written before it was recorded lack it)
        if reward.trl and prompt_format == "mixed":
            raise ModpoError(f"{pairs_path}: its prompts mix plain text and chats, and reward {name!r} "
                             f"({reward.spec}) is a TRL reward function, which takes one or the other; generate "
                             "from prompts of one kind")
    return {**callables, **served}


def check_sampling_policy(settings: Settings, pairs_path: Path, pairs_meta: dict[str, Any],
                          ref_identity: dict[str, Any]) -> None:
    """The reference defaults to the policy that sampled: another model in its place is no such reference. (A
    local directory only: a Hub id's cached snapshot may have held only its tokenizer when generate looked.)"""
    ref_path = settings.score.ref or pairs_meta["policy"]["path"]
    sampled_with = pairs_meta["policy"].get("fingerprint")
    if (not settings.score.ref and sampled_with and Path(ref_path).is_dir()
            and ref_identity["fingerprint"] != sampled_with):
        raise ModpoError(f"{pairs_path}: the policy that sampled it, {ref_path}, has changed since (other contents); "
                         "give the reference explicitly ([score].ref / --ref) to score against what is there now")


def compute_parts(work: parts.Parts, pairs: ChunkedPairs, component: str, column_name: str,
                  load: Callable[[], Any], compute: Callable[[Any, ChunkedPairs, int], tuple], what: str,
                  allow_nan: bool, progress: bool) -> list[pa.Table]:
    """The parts of one component (a reward or the reference): reuse finished ones, compute the rest.
    A part is kept only when its values are finite as stored (float32); with `allow_nan`, NaN marks a
    response to drop."""
    from tqdm.auto import tqdm

    chunks, selected, n = pairs.chunks, pairs.selected, pairs.rows
    names = {c: f"{component}-{c:05d}" for c in selected}
    done = {c: t for c, t in ((c, work.read(names[c], len(chunks[c]))) for c in selected) if t is not None}
    todo = [c for c in selected if c not in done]
    if todo:
        model = load()
        with tqdm(total=n, initial=n - sum(len(chunks[c]) for c in todo), desc=component, unit="group",
                  disable=not progress) as bar:
            for c in todo:
                counts = pairs.sizes(c)
                values, *truncated = compute(model, pairs, c)
                part = pa.table({column_name: as_lists(values, counts, pa.float32()),
                                 # per group, how many of its inputs a reward model had to shorten
                                 **({"truncated": pa.array(truncated[0], pa.int32())} if truncated else {})})
                check_part(part.select([column_name]), pairs.column("group_id", c), what, allow_nan)
                done[c] = work.write(names[c], part)
                bar.update(len(chunks[c]))
        del model  # free a model before loading the next one
    return [done[c] for c in selected]


def as_lists(flat: list, counts: list[int], value_type: pa.DataType) -> pa.Array:
    offsets = list(itertools.accumulate(counts, initial=0))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, value_type))


def reward_columns(settings: Settings, pairs_path: Path, pairs: ChunkedPairs, work: parts.Parts, ref: Reference,
                   early: dict[str, Any], prompt_format: str | None, progress: bool,
                   ) -> tuple[dict[str, pa.ChunkedArray], dict[str, int]]:
    """Every reward's column (one model in memory at a time), and how many inputs each reward model cut."""
    s, m = settings.score, settings.model
    drop_invalid = s.on_invalid_reward == "drop"
    columns: dict[str, pa.ChunkedArray] = {}
    truncated_by_reward: dict[str, int] = {}
    score_chunk = functools.partial(reward_scores, settings, pairs_path, prompt_format)
    for name, spec in s.rewards.items():
        col = schema.reward_column(name)
        load = functools.partial(reward_model, early, ref, m.trust_remote_code, name, spec)
        done = compute_parts(work, pairs, f"reward-{name}", col, load, score_chunk,
                             f"reward {name!r} ({spec})", allow_nan=drop_invalid, progress=progress)
        columns[col] = pa.chunked_array([t.column(col) for t in done], pa.list_(pa.float32()))
        if name not in early:  # (a served model cuts what is too long, or refuses it, on its side)
            truncated_by_reward[name] = sum(pc.sum(t.column("truncated")).as_py() or 0 for t in done
                                            if "truncated" in t.column_names)
    return columns, truncated_by_reward


def reward_model(early: dict[str, Any], ref: Reference, trust_remote_code: bool, name: str, spec: str) -> Any:
    """A reward set up already (a callable, a served one), or its model, loaded now."""
    return early.get(name) or load_reward(name, spec, dtype=ref.dtype, device=ref.device,
                                          trust_remote_code=trust_remote_code)


def reward_scores(settings: Settings, pairs_path: Path, prompt_format: str | None, reward: Any,
                  pairs: ChunkedPairs, c: int) -> tuple:
    """One reward's scores of every response of chunk c, in one pass (batches stay full), and with a model
    reward, how many inputs of each group it cut to fit."""
    s = settings.score
    counts = pairs.sizes(c)
    group_ids = pairs.column("group_id", c)
    messages = [schema.parse_messages(m, f"{pairs_path}: group {gid!r}")
                for m, gid in zip(pairs.column("prompt_messages", c), group_ids)]
    messages = [m for m, k in zip(messages, counts) for _ in range(k)]
    fields = None
    if schema.has_prompt_columns(pairs.table.schema):  # the prompt's other fields, for TRL-style callables
        fields = [schema.parse_prompt_columns(text, f"{pairs_path}: group {gid!r}")
                  for text, gid in zip(pairs.column(schema.PROMPT_COLUMNS[0], c), group_ids)]
        fields = [x for x, k in zip(fields, counts) for _ in range(k)]
    inputs = reward_inputs(messages, pairs.per_response("responses", c), columns=fields,
                           chat={"chat": True, "text": False}.get(prompt_format),
                           response_ids=pairs.per_response("response_ids", c))
    labels = [f"group {gid!r} response {j + 1}" for gid, k in zip(group_ids, counts) for j in range(k)]
    scores = reward.score(inputs, s.reward_batch_size, labels=labels, allow_invalid=s.on_invalid_reward == "drop",
                          invalid_hint='[score].on_invalid_reward = "drop" drops such responses instead (counted)')
    cut = getattr(reward, "truncated", None)  # model rewards: which inputs were cut to fit
    if cut is None:
        return (scores,)
    starts_of = list(itertools.accumulate(counts, initial=0))
    return scores, [sum(int(x) for x in cut[a:b]) for a, b in zip(starts_of, starts_of[1:])]


def load_reference(settings: Settings, ref: Reference) -> Any:
    return models.load_causal_lm(ref.path, dtype=ref.dtype, device=ref.device,
                                 trust_remote_code=settings.model.trust_remote_code, what=ref.what,
                                 attn_implementation=ref.attention)


def reference_logps(batch_tokens: int, pad_id: int, ref_model: Any, pairs: ChunkedPairs, c: int) -> tuple:
    prompts = [ids for ids, k in zip(pairs.column("prompt_ids", c), pairs.sizes(c)) for _ in range(k)]
    return (batched_sequence_logps(ref_model, prompts, pairs.per_response("response_ids", c), pad_id, batch_tokens,
                                   progress=False),)


def invalid_responses(columns: dict[str, pa.ChunkedArray], table: pa.Table, rewards: list[str],
                      drop_invalid: bool, work_dir: Path) -> tuple[list[list[bool]], dict[str, int]]:
    """Which responses have a finite score from every reward, and how many each reward made invalid. A
    non-finite score is an error unless on_invalid_reward = "drop"."""
    valid = [[True] * k for k in schema.group_sizes(table)]
    invalid_by_reward: dict[str, int] = {}  # name -> responses it made invalid
    for name in rewards:
        scores = columns[schema.reward_column(name)].to_pylist()
        invalid_by_reward[name] = 0
        for row, values in enumerate(scores):
            for j, value in enumerate(values):
                if not math.isfinite(value):
                    if not drop_invalid:  # parts made by an earlier run with "drop"
                        raise ModpoError(f"reward {name!r}: group {table.column('group_id')[row].as_py()!r} "
                                         f"response {j + 1} has a non-finite score (computed by an earlier run "
                                         f"with on_invalid_reward = \"drop\"; set it again, or delete {work_dir})")
                    invalid_by_reward[name] += 1
                    valid[row][j] = False
    return valid, invalid_by_reward


def write_scored(settings: Settings, pairs_path: Path, pairs: ChunkedPairs, columns: dict[str, pa.ChunkedArray],
                 work: parts.Parts, shard: shards.Shard | None, metadata: dict[str, Any], run_key: str,
                 truncated_by_reward: dict[str, int], started: float) -> ScoreReport:
    """The pairs with every score, less the responses with a non-finite reward: a group keeps its other
    responses while it has 2 to pair; one left with fewer is dropped whole."""
    s, table, n = settings.score, pairs.table, pairs.rows
    valid, invalid_by_reward = invalid_responses(columns, table, list(s.rewards), s.on_invalid_reward == "drop",
                                                 work.dir)
    dropped_responses = sum(k.count(False) for k in valid)
    kept_rows = [row.count(True) >= 2 for row in valid]
    kept = sum(kept_rows)
    if kept == 0 and not shard:  # (a shard may hold no groups: the merge checks that some shard does)
        raise ModpoError(f"{pairs_path}: no group keeps 2 responses without a NaN, inf or None reward "
                         f"({', '.join(f'{k}: {v}' for k, v in invalid_by_reward.items() if v)} responses); "
                         "nothing to write")
    has_columns = schema.has_prompt_columns(table.schema)
    scored = table.select(schema.pairs_schema(has_columns).names)
    for col, values in columns.items():
        scored = scored.append_column(col, values)
    scored = scored.cast(schema.scored_schema(s.rewards, has_columns))
    if dropped_responses:
        scored = schema.select_responses(scored, valid)
    stats = reward_stats.measure(scored, list(s.rewards))
    metadata["rewards"] = {name: {**metadata["rewards"][name], **stats[name]} for name in s.rewards}
    metadata["score_counts"] = {
        "groups_in": n, "groups_out": kept, "dropped_invalid_reward": n - kept,
        "dropped_invalid_responses": dropped_responses, "invalid_by_reward": invalid_by_reward,
        "on_invalid_reward": s.on_invalid_reward, "chunks": len(pairs.chunks), "resumed_parts": work.reused,
        "truncated_by_reward": truncated_by_reward}
    if shard:
        kept_by_chunk = [sum(kept_rows[pairs.starts[c]: pairs.starts[c] + len(pairs.chunks[c])])
                         for c in pairs.selected]
        metadata[shards.SHARD_KEY] = shards.shard_info(shard, work.key, work.manifest, pairs.selected, kept_by_chunk,
                                                       len(pairs.chunks), time.time() - started)
    else:
        metadata[parts.RUN_KEY] = run_key
    out_file = work.out
    work.write_output(scored, metadata)
    return ScoreReport(out=str(out_file), groups=scored.num_rows, rewards=stats, seconds=time.time() - started,
                       dropped_invalid_groups=n - kept, invalid_by_reward=invalid_by_reward, chunks=len(pairs.chunks),
                       resumed_parts=work.reused, truncated_by_reward=truncated_by_reward,
                       dropped_invalid_responses=dropped_responses)


def finished_report(out: Path, meta: dict, rows: int, seconds: float) -> ScoreReport:
    """The report of a scored file already written by this very run, from its metadata."""
    counts = meta["score_counts"]
    return ScoreReport(out=str(out), groups=rows,
                       rewards={n: {"mean": r["mean"], "std": r["std"]} for n, r in meta["rewards"].items()},
                       seconds=seconds, dropped_invalid_groups=counts["dropped_invalid_reward"],
                       invalid_by_reward=counts["invalid_by_reward"], chunks=counts["chunks"], resumed_parts=0,
                       truncated_by_reward=counts.get("truncated_by_reward", {}),
                       dropped_invalid_responses=counts.get("dropped_invalid_responses", 0), up_to_date=True)


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
