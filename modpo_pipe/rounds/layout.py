"""A run directory's layout: what each round of a run reads and writes, and where shard workers write; the
checks of [run] a run starts with."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

from modpo_pipe.config import Settings, validate_section
from modpo_pipe.errors import ModpoError
from modpo_pipe.runstate import model_identity, reward_identity, round_name

# The stages shard workers compute ([run].shards > 1), and the stem of their shard directories.
SHARDED_OUTPUTS = {"generate": "pairs", "score": "scored"}


class ShardsPending(ModpoError):
    """A sharded stage is open and not every shard is written yet: the stage waits for its workers."""


def check_run_settings(settings: Settings) -> None:
    r = settings.run
    validate_section(r, "run")
    if r.replay and r.reference == "previous":
        raise ModpoError("[run].replay needs [run].reference = \"fixed\": earlier rounds' cached reference "
                         "log-probs were computed against other references")
    if not r.prompts:
        raise ModpoError("no prompts: set [run].prompts in modpo.toml or pass --prompts")
    if not settings.generate.policy:
        raise ModpoError("no initial policy: set [generate].policy in modpo.toml or pass --generate-policy")
    if not settings.score.rewards:
        raise ModpoError("no reward models: add a [score.rewards] table to modpo.toml or pass --score-reward")


class RoundLayout:
    """A run directory and the settings it is advanced with: what each round's stages read and write, and where
    their shard workers write."""

    def __init__(self, run_dir: Path, settings: Settings, progress: bool | None = None, fetch: bool = True):
        """`fetch` False: Hub models not in the cache are not downloaded to fingerprint them (status)."""
        check_run_settings(settings)
        self.fetch = fetch
        self.dir = Path(run_dir).resolve()
        self.settings = settings
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._prompts: list[Any] | None = None
        self._identities: dict[str, str] = {}

    def round_dir(self, k: int) -> Path:
        return self.dir / round_name(k)

    def sampling_policy(self, k: int) -> str:
        """Round k samples with round k-1's trained policy; round 0 with the initial policy."""
        return self.settings.generate.policy if k == 0 else str(self.round_dir(k - 1) / "policy")

    def reference(self, k: int) -> str:
        if self.settings.run.reference == "previous":
            return self.sampling_policy(k)
        return self.settings.score.ref or self.settings.generate.policy

    def stats_file(self) -> Path:
        """The reward statistics every round trains with: round 0's, stored in its scored file's metadata (and
        in the manifest, in round 0's score record). With reference = "fixed" they are the reference's own
        samples' (when [score].ref is the initial policy), so every round and every replayed pair is
        z-scored toward the one target pi_ref * exp(r_w / beta); per-round statistics would shrink with the
        policy's spread and push each round further along the front. With reference = "previous" they stay
        fixed too: K rounds then compose to pi_0 * exp(K r_w / beta), the same weights at a K times smaller
        beta, whereas per-round statistics would reweight each reward by 1/std as it saturates."""
        return self.round_dir(0) / "scored.parquet"

    def replay_rounds(self, k: int) -> list[int]:
        replay = self.settings.run.replay
        if replay == 0:
            return []
        first = 0 if replay < 0 else max(0, k - replay)
        return list(range(first, k))

    def all_prompts(self) -> list[Any]:
        if self._prompts is None:
            from modpo_pipe.config import prompt_fields
            from modpo_pipe.prompts import read_prompts

            self._prompts, _ = read_prompts(Path(self.settings.run.prompts),
                                            skip_invalid=self.settings.generate.skip_invalid,
                                            fields=prompt_fields(self.settings.generate))
        return self._prompts

    def prompt_slice(self, k: int) -> list[Any]:
        """All prompts, or round k's slice of prompts_per_round, rotating through the file and wrapping."""
        records, n = self.all_prompts(), self.settings.run.prompts_per_round
        if n == 0 or n >= len(records):
            return list(records)
        start = (k * n) % len(records)
        return [records[(start + i) % len(records)] for i in range(n)]

    def _identity(self, kind: str, spec: str) -> str:
        key = f"{kind}:{spec}"
        if key not in self._identities:
            self._identities[key] = (reward_identity(spec, self.fetch) if kind == "reward"
                                     else model_identity(spec, self.fetch))
        return self._identities[key]

    # --- what a finished stage is compared against ---

    def remove_shards(self, k: int, stage: str) -> None:
        """The shard directories of a stage (of any opening): merged, or of settings no longer current."""
        if stage not in SHARDED_OUTPUTS:
            return
        for path in self.round_dir(k).glob(f"{SHARDED_OUTPUTS[stage]}-*.shards"):
            trash = path.with_name(f".{path.name}.trash")
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def shard_output(self, k: int, stage: str, key: str) -> Path:
        """The output path shard workers of this opening of a stage are given: their shards go to
        round-k/NAME-KEY.shards/ (shards.shard_dir)."""
        return self.round_dir(k) / f"{SHARDED_OUTPUTS[stage]}-{key[:16]}.parquet"

    def written_shards(self, k: int, stage: str, key: str) -> tuple[list[Path], str]:
        """The shards of this opening written so far, and what is still awaited ("" when none is)."""
        from modpo_pipe import shards

        count = self.settings.run.shards
        out = self.shard_output(k, stage, key)
        directory = shards.shard_dir(out)
        done = sorted(directory.glob(f"*-of-{count:05d}.parquet")) if directory.is_dir() else []
        if len(done) == count:
            return done, ""
        have = {p.name for p in done}
        missing = [i for i in range(count) if shards.shard_name((i, count)) not in have]
        failed = [(i, note) for i in missing if (note := shards.failure(out, (i, count)))]
        failures = "".join(f"; shard {i}/{count} failed on {note.get('host', '?')} at {note.get('finished', '?')}: "
                           f"{note.get('error', '')}" for i, note in failed[:3])
        return done, (f"waiting for shard workers: {len(done)} of {count} shards written (missing "
                      f"{', '.join(f'{i}/{count}' for i in missing[:8])}{' ...' if len(missing) > 8 else ''}"
                      f"{failures}); they run as `modpo-pipe run --workdir {self.dir} --shard I/{count}`")

    def merge_shards(self, k: int, stage: str, key: str, out: Path) -> None:
        """Merge the N shards of this opening into `out`, or raise ShardsPending while some are missing."""
        from modpo_pipe import shards

        done, waiting = self.written_shards(k, stage, key)
        if waiting:
            raise ShardsPending(waiting)
        try:
            shards.merge(done, out)
        except shards.DamagedShard as e:  # set aside, not deleted; its worker's next firing computes it again
            aside = e.path.with_name(f".{e.path.name}.damaged")
            e.path.replace(aside)
            raise ShardsPending(f"{e}; set aside as {aside.name}, for its worker to compute again") from None

    def stage_job(self, k: int, stage: str, key: str | None = None) -> tuple[Settings, Path, Path]:
        """The settings, input and output of round k's generate or score; with `key`, the output a shard
        worker of that opening is given."""
        round_dir = self.round_dir(k)
        if stage == "generate":
            g, source, out = self.settings.generate, round_dir / "prompts.jsonl", round_dir / "pairs.parquet"
            out = self.shard_output(k, stage, key) if key else out
            # Each round draws other samples: the seed is offset by the round. The round's prompts.jsonl holds
            # modpo-pipe's own field names, whatever [run].prompts called them, and the other columns.
            return dataclasses.replace(self.settings, generate=dataclasses.replace(
                g, policy=self.sampling_policy(k), seed=g.seed + k, out=str(out), split="", prompt_field="prompt",
                messages_field="messages", id_field="id")), source, out
        source, out = round_dir / "pairs.parquet", round_dir / "scored.parquet"
        out = self.shard_output(k, stage, key) if key else out
        return dataclasses.replace(self.settings, score=dataclasses.replace(
            self.settings.score, ref=self.reference(k), out=str(out))), source, out
