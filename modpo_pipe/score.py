"""Stage 2, pairs.parquet -> scored.parquet: every reward for both responses, and the reference model's
summed log-prob of both, on exactly the stored token ids."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from modpo_pipe import models, schema
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError
from modpo_pipe.logprobs import batched_sequence_logps
from modpo_pipe.rewards import load_reward, reward_inputs


@dataclass
class ScoreReport:
    out: str
    pairs: int
    rewards: dict[str, dict[str, float]]  # name -> {"mean", "std"}
    seconds: float


def run_score(settings: Settings, pairs_path: Path, out: Path, progress: bool = True) -> ScoreReport:
    s, m = settings.score, settings.model
    if not s.rewards:
        raise ModpoError("no reward models: add a [score.rewards] table to modpo.toml or pass --reward NAME=SPEC")
    for name in s.rewards:
        schema.check_reward_name(name)
    started = time.time()
    table, pairs_meta = schema.read_table(pairs_path, "pairs")
    ref_path = s.ref or pairs_meta["policy"]["path"]
    device = models.resolve_device(m.device)
    dtype = models.resolve_dtype(m.dtype, device)

    tokenizer = models.load_tokenizer(ref_path, m.trust_remote_code, what="[score].ref")
    if models.tokenizer_fingerprint(tokenizer) != pairs_meta["tokenizer_fingerprint"]:
        raise ModpoError(f"{pairs_path}: was tokenised with another tokenizer than the reference {ref_path}'s; "
                         "its stored ids would mean other tokens")
    schema.check_token_ids(table, len(tokenizer), str(pairs_path))

    columns: dict[str, list[float]] = {}
    stats: dict[str, dict[str, float]] = {}
    specs: dict[str, dict[str, str]] = {}
    n = table.num_rows
    messages = table.column("prompt_messages").to_pylist()
    responses_1, responses_2 = table.column("response_1").to_pylist(), table.column("response_2").to_pylist()
    for name, spec in s.rewards.items():
        reward = load_reward(name, spec, dtype=dtype, device=device, trust_remote_code=m.trust_remote_code)
        # Both responses in one pass: batches stay full, and the stats are over all responses.
        inputs = reward_inputs(messages * 2, responses_1 + responses_2)
        both = reward.score(inputs, s.reward_batch_size, progress=progress)
        col_1, col_2 = schema.reward_columns(name)
        columns[col_1], columns[col_2] = both[:n], both[n:]
        stats[name] = {"mean": statistics.fmean(both), "std": statistics.pstdev(both)}
        specs[name] = {"spec": spec, "fingerprint": reward.fingerprint()}
        del reward  # free a reward model before loading the next one

    ref = models.load_causal_lm(ref_path, dtype=dtype, device=device, trust_remote_code=m.trust_remote_code,
                                what="[score].ref")
    prompt_ids = table.column("prompt_ids").to_pylist()
    response_ids = table.column("response_ids_1").to_pylist() + table.column("response_ids_2").to_pylist()
    ref_logps = batched_sequence_logps(ref, prompt_ids * 2, response_ids, tokenizer.pad_token_id,
                                       s.batch_tokens, progress=progress, desc="reference log-probs")
    columns["ref_logp_1"], columns["ref_logp_2"] = ref_logps[:n], ref_logps[n:]

    scored = table.select(schema.pairs_schema().names)
    for name in s.rewards:
        for col in schema.reward_columns(name):
            scored = scored.append_column(col, pa.array(columns[col], pa.float32()))
    for col in ("ref_logp_1", "ref_logp_2"):
        scored = scored.append_column(col, pa.array(columns[col], pa.float32()))
    scored = scored.cast(schema.scored_schema(s.rewards))
    metadata = {
        **pairs_meta,
        **schema.make_metadata("scored"),
        "pairs_file": str(pairs_path),
        "ref": {**models.identity(ref_path), "dtype": str(dtype).removeprefix("torch.")},
        "rewards": {name: {**specs[name], **stats[name]} for name in s.rewards},
    }
    schema.write_table(scored, out, metadata)
    return ScoreReport(str(out), scored.num_rows, stats, time.time() - started)
