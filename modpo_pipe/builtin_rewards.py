"""Two built-in rewards for the embedded demo, usable as ``py:modpo_pipe.builtin_rewards:<name>``.

Both follow the reward-callable contract ``(prompts, responses) -> list[float]`` (one score per
response, higher is better) and both live in [-1, 1] (each declares it: ``fn.bounds``), so neither
objective dominates MODPO's weighted combination merely through its units. They pull in opposite
directions, which is what makes the demo a real multi-objective trade-off: VADER's compound score tends
to grow as a reply accumulates more positive words (longer), while :func:`concision` rewards shorter
replies.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

__all__ = ["CONCISION_SCALE_WORDS", "concision", "positivity"]

#: Word count at which :func:`concision`'s curve has fallen by tanh(1) = 76% of its way down.
CONCISION_SCALE_WORDS = 100.0


def _check(prompts: list[str], responses: list[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


@lru_cache(maxsize=1)
def _vader() -> Any:
    """The VADER analyzer, built on first use (loads its lexicon, ~0.1 s) and then shared."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ImportError(
            "the positivity reward needs vaderSentiment: pip install 'modpo-pipe[demo]' "
            "(or pip install vaderSentiment)"
        ) from e
    return SentimentIntensityAnalyzer()


def positivity(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1] (the prompt is ignored).

    VADER is a lexicon-and-rules scorer that ships its lexicon on PyPI, so it is a real sentiment
    signal needing no model download; about 2 ms per response. Neutral or empty text scores 0.
    """
    _check(prompts, responses)
    analyzer = _vader()
    return [float(analyzer.polarity_scores(r)["compound"]) for r in responses]


positivity.bounds = (-1.0, 1.0)  # every score's range (modpo_pipe.rewards): `front` measures from it


def concision(prompts: list[str], responses: list[str]) -> list[float]:
    """Length reward ``1 - 2 * tanh(words / 100)`` in [-1, 1], with words = whitespace-split count.

    Why this shape: 1 word scores 0.98, 20 words 0.61, ~55 words 0, 100 words -0.52, 200 words -0.93,
    approaching -1 for very long replies. So it (a) spans the same [-1, 1] range as
    :func:`positivity`, making equal weights a fair starting point; (b) strongly prefers shorter
    answers, penalising each extra word most when the reply is short (about 0.02 per word at first,
    0.008 at 100 words, 0.003 at 200); and (c) never goes completely flat: unlike a clipped linear
    penalty such as ``1 - min(words, 200) / 100``, of two long replies the shorter still scores higher
    (small margins past ~300 words; pairs that both hit the token limit at equal length tie anyway).
    An empty or whitespace-only response gets exactly -1, strictly below every real answer,
    so the policy cannot win the objective by saying nothing.
    """
    _check(prompts, responses)
    out: list[float] = []
    for r in responses:
        words = len(r.split())
        out.append(-1.0 if words == 0 else 1.0 - 2.0 * math.tanh(words / CONCISION_SCALE_WORDS))
    return out


concision.bounds = (-1.0, 1.0)
