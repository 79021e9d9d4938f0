"""What every sampling backend returns, and the seeding and stop rules they share. The backends (hf.py,
vllm.py) import these from here, not from the package face, which imports the backends."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class Sample:
    ids: list[int]  # response token ids, the EOS included when the model emitted it; nothing after it
    finish_reason: str  # "stop" | "length"
    logp: float | None  # the sampler's summed raw log-prob of ids (None when it cannot tell)


def batch_seed(seed: int, batch_index: int) -> int:
    """A per-batch seed: reruns over the same prompts and batch size draw the same samples."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()[:4], "little")


def split_response(generated: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Cut a generated row after its first stop token (kept); what follows is padding."""
    for pos, token in enumerate(generated):
        if token in stop_ids:
            return generated[: pos + 1], "stop"
    return generated, "length"
