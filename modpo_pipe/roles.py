"""What a setting means to the pipeline, declared once in its `setting(...)` in config.py and read from there by
everything that must agree on it: validation, the fingerprints that decide whether finished work still stands
(rounds' recorded settings and resume keys, train's run fingerprint), and the flags `run` and `eval` leave out.

A setting's `result` says how it reaches a result:
  "value"    its value changes what the stage writes: fingerprints record the value (under `recorded_as`)
  "content"  it names something (a model, the prompts, a column of them) whose content fingerprints record
             instead of the name, so moving a model keeps finished work
  "none"     it cannot change a result (devices, batch sizes of scoring, logging, where outputs go)

A new setting that changes results needs nothing more than its declaration; one that must not be recorded says
result="none". Fingerprints already recorded stay valid as long as no declaration of a recorded setting changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RESULTS = ("value", "content", "none")
_UNSET = object()


@dataclass(frozen=True)
class Role:
    choices: tuple[str, ...] = ()  # the values allowed, when they are a fixed set
    # ("> 0" | ">= 0" | "<= 1024" | "[0, 1)" | "(0, 1]", why): each must hold; `why` is said when one does not
    bounds: tuple[tuple[str, str], ...] = ()
    result: str = "value"
    # It may change while a killed stage resumes: the work it left does not depend on it (a batch size
    # lowered after an out-of-memory kill; train records the global batch instead).
    resume_free: bool = False
    resume_if: str = ""  # the condition a resume under another value still needs, said in the docs
    # The stage's work directory (OUT.parts/) records it: a killed attempt resumes only under the same value.
    work: bool = False
    run_sets: bool = False  # `run` sets it for each round itself: no flag there, not compared between rounds
    eval_flag: bool = True  # `eval` takes its flag (False: eval writes no file the setting is about)
    # The name fingerprints and resume keys record it under, also read from modpo.toml and as a flag, so that
    # runs recorded under that name keep matching.
    recorded_as: str | None = None
    in_legacy_key: bool = True  # part of the resume key of runs recorded before resume keys left batch sizes out
    # A setting whose value at `unrecorded_at` behaves as if the setting did not exist: fingerprints leave it out
    # there, so what was recorded without it still matches.
    unrecorded_at: Any = _UNSET

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}; got {self.result!r}")
        for bound, _ in self.bounds:
            _parse(bound)

    def recorded(self, value: Any) -> bool:
        return self.result == "value" and not (self.unrecorded_at is not _UNSET and value == self.unrecorded_at)


def described(r: Role) -> str:
    """The role in words (docs/configuration.md)."""
    words = {"value": "yes", "content": "by content", "none": "no"}[r.result]
    if r.resume_free:
        words += "; a killed run resumes under another" + (f" while {r.resume_if}" if r.resume_if else "")
    if r.work:
        words += "; a killed run resumes only under the same"
    if r.run_sets:
        words += "; `run` sets it"
    return words


def role(f: dataclasses.Field) -> Role:
    return f.metadata["role"]


def recorded_name(f: dataclasses.Field) -> str:
    return role(f).recorded_as or f.name


# ------------------------------------------------------------------------------------------- fingerprints


def recorded_settings(section: Any, *, by_run: bool = False, for_resume: bool = False) -> dict[str, Any]:
    """A section's settings whose values fingerprints record, by recorded name. `by_run`: as a `run` records
    them (what it sets itself is recorded as what it set); `for_resume`: the settings a resumed state must share
    (without those that may change on resume)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        r, value = role(f), getattr(section, f.name)
        if not r.recorded(value) or (by_run and r.run_sets) or (for_resume and r.resume_free):
            continue
        out[recorded_name(f)] = value
    return out


def resume_free_names(section: Any) -> set[str]:
    return {recorded_name(f) for f in dataclasses.fields(section) if role(f).resume_free}


def work_settings(section: Any) -> dict[str, Any]:
    """The settings a stage's work directory records, by field name."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if role(f).work}


def legacy_key_settings(section: Any) -> dict[str, Any]:
    """Every setting of the section the legacy resume key hashed, by recorded name, as dataclasses.asdict."""
    values = dataclasses.asdict(section)
    return {recorded_name(f): values[f.name] for f in dataclasses.fields(section) if role(f).in_legacy_key}


def fields_where(cls: type, section: str, **wanted: Any) -> frozenset[tuple[str, str]]:
    """(section, key) of the settings of `cls` whose role has every attribute of `wanted` at that value."""
    return frozenset((section, f.name) for f in dataclasses.fields(cls)
                     if all(getattr(role(f), name) == value for name, value in wanted.items()))


# ------------------------------------------------------------------------------------------------ validation


def _parse(bound: str) -> tuple[float | None, bool, float | None, bool]:
    """(low, low inclusive, high, high inclusive) of a bound's text."""
    if bound[:1] in "([":
        low, high = (float(x) for x in bound[1:-1].split(","))
        return low, bound[0] == "[", high, bound[-1] == "]"
    op, number = bound.split()
    limits = {">": (float(number), False, None, False), ">=": (float(number), True, None, False),
              "<=": (None, False, float(number), True)}
    if op not in limits:
        raise ValueError(f"unknown bound {bound!r}")
    return limits[op]


def _within(value: float, bound: str) -> bool:
    low, low_in, high, high_in = _parse(bound)
    if low is not None and not (value >= low if low_in else value > low):
        return False
    return high is None or (value <= high if high_in else value < high)


def _said(bound: str) -> str:
    if bound[:1] in "([":
        return f"in {bound}"
    return f"at most {bound.split()[1]}" if bound.startswith("<=") else bound


def problem(f: dataclasses.Field, value: Any, where: str) -> str | None:
    """Why `value` is not allowed for the setting `f` (named `where` in the message), or None."""
    r = role(f)
    if r.choices and value not in r.choices:
        return f"{where} must be one of {', '.join(r.choices)}; got {value!r}"
    items = value.items() if isinstance(value, dict) else [("", value)]
    for name, item in items:
        for bound, why in r.bounds:
            if not _within(item, bound):
                named = f"{where}.{name}" if name else where
                return f"{named} must be {_said(bound)}{f' ({why})' if why else ''}; got {item}"
    return None
