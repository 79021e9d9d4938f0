"""Stage 1, prompts -> pairs.parquet: sample N responses per prompt and store them as one group (one row).

Token ids are stored as sampled; every later stage scores exactly those ids, never a re-tokenisation.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from modpo_pipe import schema, storage
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError, out_of_memory
from modpo_pipe.generate.sampling import Sample, batch_seed


@dataclass
class GenerateReport:
    out: str
    prompts: int
    groups: int  # rows written: one group of samples_per_prompt responses per prompt
    skipped_invalid: int
    long_prompts_dropped: int
    long_prompts_truncated: int
    backend: str
    seconds: float
    response_tokens: int  # sampled by this invocation (a resumed run does not count the chunks it reused)
    chunks: int = 1
    resumed_chunks: int = 0  # chunks found finished in OUT.parts/ from a killed run
    up_to_date: bool = False  # OUT was already written from these prompts, policy and settings: nothing sampled


def choose_backend(name: str) -> str:
    if name != "auto":
        return name
    import torch

    from modpo_pipe.generate.vllm import vllm_available

    return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"


@dataclass
class PreparedPrompts:
    """Prompts as a model sees them: rendered, tokenised, and cut to the longest it can take with a reply."""

    records: list  # the prompts kept (prompts.PromptRecord), shortened where long_prompts = "truncate"
    texts: list[str]
    ids: list[list[int]]
    dropped: int  # longer than `limit`, dropped
    truncated: int  # longer than `limit`, shortened
    backend: str  # the sampling backend chosen
    limit: int  # the most prompt tokens kept (prompt_token_limit)


def prepare_prompts(records: list, tokenizer, settings: Settings, model_path: str, prompts_path: Path,
                    stats=None) -> PreparedPrompts:
    """The prompts of `prompts_path` as the model at `model_path` will be sampled from (generate's policy, eval's
    reference and the policies sharing its tokenizer): one line of error when none is left."""
    from modpo_pipe import models

    backend = choose_backend(settings.generate.backend)
    context = models.context_length(model_path, settings.model.trust_remote_code)
    limit = prompt_token_limit(settings, context, backend)
    records, texts, ids, dropped, truncated = render_prompts(records, tokenizer, settings, limit, stats)
    require_prompts(records, prompts_path, settings, limit, context)
    return PreparedPrompts(records=records, texts=texts, ids=ids, dropped=dropped, truncated=truncated,
                           backend=backend, limit=limit)


def require_prompts(records: list, prompts_path: Path, settings: Settings, limit: int, context: int) -> None:
    """One line when render_prompts kept no prompt (every one too long for the limit)."""
    if not records:
        g = settings.generate
        raise ModpoError(f"{prompts_path}: every prompt is longer than {limit} tokens (max_prompt_tokens="
                         f"{g.max_prompt_tokens}, policy context {context}, max_new_tokens={g.max_new_tokens})")


def render_prompts(records, tokenizer, settings: Settings, max_tokens: int | None = None, stats=None,
                   ) -> tuple[list, list[str], list[list[int]], int, int]:
    """Render and tokenise prompts, applying the long-prompt policy to prompts longer than `max_tokens`
    (default [generate].max_prompt_tokens); returns the kept records too. A prompt the chat template refuses is
    an error, or with [generate].skip_invalid a skipped row, counted in `stats` (prompts.PromptStats)."""
    g = settings.generate
    limit = g.max_prompt_tokens if max_tokens is None else max_tokens
    kept, texts, ids_list = [], [], []
    dropped = truncated = refused = 0
    from modpo_pipe.prompts import render

    for record in records:
        try:
            text, ids = render(record, tokenizer, g.chat_template, limit)
        except ModpoError:  # a prompt the chat template refuses: a bad row, skipped with the others when asked
            if not g.skip_invalid:
                raise
            refused += 1
            continue
        if len(ids) > limit:
            shortened = shorten_prompt(record, tokenizer, g.chat_template, limit) if g.long_prompts == "truncate" \
                else None
            if shortened is None:  # "drop", or a template longer than the limit on its own
                dropped += 1
                continue
            record = shortened
            text, ids = render(record, tokenizer, g.chat_template)
            truncated += 1
        kept.append(record)
        texts.append(text)
        ids_list.append(ids)
    if refused and stats is not None:
        stats.skipped_invalid += refused
        stats.read -= refused
    if refused and not kept and not dropped:
        raise ModpoError(f"the policy's chat template refuses every prompt ({refused} skipped as invalid)")
    return kept, texts, ids_list, dropped, truncated


def shorten_prompt(record, tokenizer, use_chat_template: bool, limit: int):
    """The prompt record with text cut from the start of its content until it renders to at most `limit` tokens
    (None if the template alone is longer). The conversation is cut, not the rendered ids: the BOS, the
    template's headers and the generation prompt stay, and the reward models, which read the stored
    `prompt_messages`, see the same shortened prompt as the policy and the reference."""
    from modpo_pipe.prompts import fit_messages, max_token_chars, render

    def record_of(messages):
        if record.messages is not None:
            return dataclasses.replace(record, messages=messages)
        return dataclasses.replace(record, prompt=messages[0]["content"])

    # A message longer than 2 * limit tokens can hold keeps at most its last `limit` tokens anyway: cut it to that
    # many characters first, so that a 50 MB prompt is never tokenised whole, here as in render.
    bound = 2 * limit * max_token_chars(tokenizer)
    messages = [{**m, "content": m["content"][-bound:]} for m in raw_messages(record)]
    fitted = fit_messages(messages, lambda m: len(render(record_of(m), tokenizer, use_chat_template)[1]),
                          limit, tokenizer)
    return record_of(fitted) if fitted is not None else None


def sample(settings: Settings, policy: str, tokenizer, prompt_ids: list[list[int]], n: int, backend: str,
           progress: bool = True, *, seed: int | None = None, model=None,
           engine_len: int = 0) -> list[list[Sample]]:
    """n samples per prompt from `policy` with the [generate] sampling settings, on the chosen backend.
    `seed` defaults to [generate].seed; `model` is an already loaded transformers policy (loaded if None);
    `engine_len`: the vLLM engine's max_model_len when [generate].vllm_max_model_len leaves it to us (0: what
    these prompts need)."""
    g, m = settings.generate, settings.model
    seed = g.seed if seed is None else seed
    if backend == "vllm":
        from modpo_pipe.generate.vllm import sample_vllm

        try:
            return sample_vllm(
                policy, prompt_ids, n, temperature=g.temperature, top_p=g.top_p,
                max_new_tokens=g.max_new_tokens, seed=seed, dtype=m.dtype,
                max_model_len=g.vllm_max_model_len or engine_len,
                gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                tensor_parallel_size=g.vllm_tensor_parallel_size, enforce_eager=g.vllm_enforce_eager,
                trust_remote_code=m.trust_remote_code,
            )
        except (ValueError, RuntimeError) as e:
            raise ModpoError(f"vllm backend: {e}") from e
    from modpo_pipe.generate.hf import sample_transformers

    if model is None:
        model = load_policy(settings, policy)
    return sample_transformers(
        model, tokenizer, prompt_ids, n, temperature=g.temperature, top_p=g.top_p,
        max_new_tokens=g.max_new_tokens, seed=seed, batch_size=g.batch_size, progress=progress,
    )


def load_policy(settings: Settings, policy: str, what: str = "policy"):
    """The transformers policy on the configured device and dtype."""
    from modpo_pipe import models

    m = settings.model
    device = models.resolve_device(m.device)
    return models.load_causal_lm(policy, dtype=models.resolve_dtype(m.dtype, device), device=device,
                                 trust_remote_code=m.trust_remote_code, what=what)


def raw_messages(record) -> list[dict[str, str]]:
    """The un-rendered conversation, for reward models that apply their own chat template."""
    return record.messages if record.messages is not None else [{"role": "user", "content": record.prompt}]


def prompt_token_limit(settings: Settings, context: int | None, backend: str = "transformers") -> int:
    """Longest prompt kept as is: max_prompt_tokens, and never more than the context leaves for a response."""
    g = settings.generate
    if backend == "vllm" and g.vllm_max_model_len > 0:
        if context is not None and g.vllm_max_model_len > context:
            raise ModpoError(f"[generate].vllm_max_model_len={g.vllm_max_model_len} is beyond the policy's context "
                             f"of {context} tokens")
        context = min(context or g.vllm_max_model_len, g.vllm_max_model_len)
    if context is None:
        return g.max_prompt_tokens
    room = context - g.max_new_tokens
    if room <= 0:
        raise ModpoError(f"[generate].max_new_tokens={g.max_new_tokens} leaves no room for a prompt in the "
                         f"policy's context of {context} tokens")
    return min(g.max_prompt_tokens, room)


def prompts_fingerprint(records, prompt_ids: list[list[int]]) -> str:
    """What the prompts of a run are, as the policy sees them: ids, texts and token ids, in order."""
    h = hashlib.sha256()
    for record, ids in zip(records, prompt_ids):
        # The other columns only where there are some: prompts without them keep the fingerprint they had.
        h.update(json.dumps([record.id, record.prompt, record.messages, ids, *([record.columns] if record.columns
                                                                               else [])]).encode())
    return h.hexdigest()[:32]


def prompt_format(records) -> str:
    """Whether the prompts were plain text, chats, or both: TRL-style reward functions are called with strings
    or with message lists accordingly (score reads it from the pairs file's metadata)."""
    chats = {record.messages is not None for record in records}
    return "mixed" if len(chats) > 1 else "chat" if chats == {True} else "text"


def column_names(records) -> list[str]:
    """Every other column any prompt has, in order of first appearance: the keys of every row's prompt_columns."""
    return list(dict.fromkeys(name for record in records for name in record.columns))


@out_of_memory("generate", "[generate].batch_size (prompts per batch, each sampled samples_per_prompt "
               "times) or max_new_tokens")
def run_generate(settings: Settings, prompts_path: Path, out: Path, round_index: int = 0,
                 progress: bool = True, shard: tuple[int, int] | None = None) -> GenerateReport:
    """Sample every prompt and write `out`; with `shard` (I, N), only chunks I, I+N, ... into shard file I of
    OUT.shards/ (see shards.py; `modpo-pipe merge` joins them).

    Resumable: the prompts are cut into chunks of [generate].chunk_size, each finished chunk is kept as a
    part file in OUT.parts/ (see parts.py), and the parts are merged into `out` once all exist. Chunk c
    samples with seed batch_seed(seed, c), so a rerun after a kill writes exactly the rows an uninterrupted
    run would, with no group_id missing or twice.
    """
    from modpo_pipe import models, parts, shards
    from modpo_pipe.config import prompt_fields
    from modpo_pipe.prompts import read_prompts

    g, m = settings.generate, settings.model
    if not g.policy:
        raise ModpoError("no policy: set [generate].policy in modpo.toml or pass --policy")
    storage.refuse_overwriting_input(out, prompts_path)
    started = time.time()
    records, prompt_stats = read_prompts(prompts_path, skip_invalid=g.skip_invalid, fields=prompt_fields(g))
    tokenizer = models.load_tokenizer(g.policy, m.trust_remote_code, what="[generate].policy")
    prompts = prepare_prompts(records, tokenizer, settings, g.policy, prompts_path, prompt_stats)
    columns = column_names(prompts.records)
    sampling = {"backend": prompts.backend, "temperature": g.temperature, "top_p": g.top_p,
                "max_new_tokens": g.max_new_tokens, "samples_per_prompt": g.samples_per_prompt,
                "chat_template": g.chat_template, "max_prompt_tokens": g.max_prompt_tokens,
                "prompt_token_limit": prompts.limit, "dtype": m.dtype}
    policy = models.identity(g.policy)
    tokenizer_fingerprint = models.tokenizer_fingerprint(tokenizer)
    chunks = parts.chunk_ranges(len(prompts.records), g.chunk_size)
    # What a part must have been made with to be reused. Batch sizes are left out on purpose: lowering one
    # after an out-of-memory kill must not throw the finished chunks away.
    out_file = shards.shard_path(out, shard) if shard else out
    work = parts.Parts(out_file, {
        "stage": "pairs", "prompts": prompts_fingerprint(prompts.records, prompts.ids),
        "policy": policy["fingerprint"], "tokenizer": tokenizer_fingerprint, "sampling": sampling, "seed": g.seed,
        "round": round_index, "shard_size": g.chunk_size,
        "dtype": str(models.resolve_dtype(m.dtype, models.resolve_device(m.device))),
    }).open()
    selected = parts.select_chunks(len(chunks), shard)  # this invocation's chunks: all, or its shard's
    report = functools.partial(
        GenerateReport, out=str(out_file), prompts=len(prompts.records), skipped_invalid=prompt_stats.skipped_invalid,
        long_prompts_dropped=prompts.dropped, long_prompts_truncated=prompts.truncated, backend=prompts.backend)
    if shard and (meta := shards.finished(out_file, work.key)):  # a rerun of a finished shard: nothing to do
        return report(groups=sum(meta[shards.SHARD_KEY]["chunk_rows"]), seconds=time.time() - started,
                      response_tokens=0, chunks=len(selected), resumed_chunks=len(selected))
    if not shard and (found := parts.finished_output(out, "pairs", work.key)) and found[1] == len(prompts.records):
        return report(groups=found[1], seconds=time.time() - started, response_tokens=0, chunks=len(chunks),
                      resumed_chunks=0, up_to_date=True)
    tables, todo, response_tokens = sample_chunks(settings, prompts, tokenizer, work, chunks, selected,
                                                  round_index, columns, progress)
    # Every chunk of this invocation is here (a shard's: `modpo-pipe merge` joins the shards).
    table = pa.concat_tables([tables[c] for c in selected]) if selected \
        else schema.pairs_schema(bool(columns)).empty_table()
    metadata = schema.make_metadata(
        "pairs", policy=policy, tokenizer_fingerprint=tokenizer_fingerprint, sampling=sampling, seed=g.seed,
        round=round_index, prompts_file=str(prompts_path), prompt_format=prompt_format(prompts.records),
        counts={"prompts": len(prompts.records), "skipped_invalid": prompt_stats.skipped_invalid,
                "long_prompts_dropped": prompts.dropped, "long_prompts_truncated": prompts.truncated,
                "chunks": len(chunks), "resumed_chunks": len(selected) - len(todo)},
    )
    if shard:
        metadata[shards.SHARD_KEY] = shards.shard_info(shard, work.key, work.manifest, selected,
                                                       [tables[c].num_rows for c in selected], len(chunks),
                                                       time.time() - started)
    else:
        metadata[parts.RUN_KEY] = work.key
    work.write_output(table, metadata)
    return report(groups=table.num_rows, seconds=time.time() - started, response_tokens=response_tokens,
                  chunks=len(selected), resumed_chunks=len(selected) - len(todo))


def sample_chunks(settings: Settings, prompts: PreparedPrompts, tokenizer, work, chunks: list[range],
                  selected: list[int], round_index: int, columns: list[str], progress: bool,
                  ) -> tuple[dict[int, pa.Table], list[int], int]:
    """Every selected chunk's rows: read from its finished part, or sampled now and written as one. Returns the
    tables by chunk, the chunks sampled now, and the response tokens sampled."""
    from tqdm.auto import tqdm

    from modpo_pipe import parts

    g = settings.generate
    names = [f"part-{c:05d}" for c in range(len(chunks))]
    tables: dict[int, pa.Table] = {}
    for c in selected:
        table = work.read(names[c], len(chunks[c]))
        if table is not None:
            tables[c] = table
    todo = [c for c in selected if c not in tables]
    if tables:
        parts.warn(f"resuming: {len(tables)} of {len(selected)} chunks already done in {work.dir}")
    if not todo:
        return tables, todo, 0
    response_tokens = 0
    model = load_policy(settings, g.policy, "[generate].policy") if prompts.backend != "vllm" else None
    # One vLLM engine length for every chunk: sized by each chunk's own prompts, a chunk with a longer prompt
    # than the ones before would restart the engine (minutes, with a real model on a GPU).
    engine_len = max(len(ids) for ids in prompts.ids) + g.max_new_tokens
    prompts_here = sum(len(chunks[c]) for c in selected)
    with tqdm(total=prompts_here, initial=prompts_here - sum(len(chunks[c]) for c in todo),
              desc="generate", unit="prompt", disable=not progress) as bar:
        for c in todo:
            rows = slice(chunks[c].start, chunks[c].stop)
            samples = sample(settings, g.policy, tokenizer, prompts.ids[rows], g.samples_per_prompt, prompts.backend,
                             progress=False, seed=batch_seed(g.seed, c), model=model, engine_len=engine_len)
            table = groups_table(prompts.records[rows], prompts.texts[rows], prompts.ids[rows], samples, tokenizer,
                                 round_index, columns)
            tables[c] = work.write(names[c], table)
            response_tokens += sum(len(s.ids) for per_prompt in samples for s in per_prompt)
            bar.update(len(chunks[c]))
    if prompts.backend == "vllm":
        from modpo_pipe.generate.vllm import shutdown_vllm

        shutdown_vllm()  # free the engine (and its GPU memory) before this process scores or trains
    return tables, todo, response_tokens


def groups_table(records, prompt_texts, prompt_ids, samples, tokenizer, round_index: int,
                 columns: list[str] | None = None) -> pa.Table:
    """Rows of the pairs contract: one row per prompt, holding every response sampled for it, in order; with
    `columns` (the names of the prompts' other fields), their values in prompt_columns."""
    target = schema.pairs_schema(bool(columns))
    rows: dict[str, list] = {name: [] for name in target.names}
    for record, text, ids, per_prompt in zip(records, prompt_texts, prompt_ids, samples):
        rows["group_id"].append(f"r{round_index}/{record.id}")
        rows["prompt_id"].append(record.id)
        rows["prompt"].append(text)
        rows["prompt_messages"].append(json.dumps(raw_messages(record), ensure_ascii=False))
        rows["prompt_ids"].append(ids)
        rows["responses"].append([tokenizer.decode(smp.ids, skip_special_tokens=True) for smp in per_prompt])
        rows["response_ids"].append([smp.ids for smp in per_prompt])
        rows["finish_reasons"].append([smp.finish_reason for smp in per_prompt])
        rows["gen_logps"].append([smp.logp for smp in per_prompt])
        rows["round"].append(round_index)
        if columns:
            rows[schema.PROMPT_COLUMNS[0]].append(json.dumps({name: record.columns.get(name) for name in columns},
                                                             ensure_ascii=False))
    return pa.Table.from_pydict(rows, schema=target)
