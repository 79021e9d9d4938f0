"""Reward specs: a sequence-classification model (its single logit is the reward) or a Python callable.

    helpful  = "path/or/hub-id"                      a model, reading prompt + response through ITS OWN
                                                      tokenizer and chat template
    concise  = "py:package.module:function"          a callable (prompts, responses) -> list[float]
    positive = "py:path/to/file.py:function"

A callable may declare the range its scores lie in as an attribute, `function.bounds = (low, high)`: `eval`
records it, and `front` measures hypervolume from the low bounds (a fixed point, the same for every front).

A `py:` spec runs code the user chose: it is imported and called like any other Python they run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm

from modpo_pipe import storage
from modpo_pipe.errors import ModpoError


@dataclass
class RewardInput:
    messages: list[dict[str, str]]  # the conversation before the response, un-rendered
    response: str

    @property
    def prompt(self) -> str:
        """What a callable sees as the prompt: the last user turn (for plain prompts, the prompt itself)."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


class Reward:
    """One named reward; `score` returns one finite float per input, or raises ModpoError."""

    def __init__(self, name: str, spec: str):
        self.name, self.spec = name, spec
        self.bounds: tuple[float, float] | None = None  # (low, high) of every score, where the reward declares it

    def fingerprint(self) -> str:
        raise NotImplementedError

    def score(self, inputs: Sequence[RewardInput], batch_size: int, progress: bool = False, *,
              labels: Sequence[str] | None = None, allow_invalid: bool = False, invalid_hint: str = "") -> list[float]:
        """One float per input. A NaN, inf or None score raises, naming the input (`labels[i]`, else
        "response i") and ending with `invalid_hint` (what the caller's user can do about it), or with
        allow_invalid comes back as NaN for the caller to drop and count. A callable
        that raises, returns something other than a list, the wrong count or a non-number always raises."""
        order = self.batch_order(inputs)
        scores: list[float] = [math.nan] * len(inputs)
        for start in tqdm(range(0, len(order), batch_size), desc=f"reward {self.name}", unit="batch",
                          disable=not progress):
            chunk = order[start : start + batch_size]
            values = self._check(self._score_batch([inputs[i] for i in chunk]), chunk, labels=labels,
                                 allow_invalid=allow_invalid, invalid_hint=invalid_hint)
            for i, value in zip(chunk, values):
                scores[i] = value
        return scores

    def batch_order(self, inputs: Sequence[RewardInput]) -> list[int]:
        """The order inputs are batched in (scores come back in input order whatever it is)."""
        return list(range(len(inputs)))

    def _score_batch(self, inputs: Sequence[RewardInput]) -> list[float]:
        raise NotImplementedError

    def _check(self, values: Any, indices: Sequence[int], *, labels: Sequence[str] | None = None,
               allow_invalid: bool = False, invalid_hint: str = "") -> list[float]:
        where = f"reward {self.name!r} ({self.spec})"
        values = _score_list(values, where)
        if len(values) != len(indices):
            raise ModpoError(f"{where} returned {len(values)} scores for {len(indices)} responses")
        hint = f"; {invalid_hint}" if invalid_hint else ""
        checked = []
        for i, value in enumerate(values):
            at = labels[indices[i]] if labels is not None else f"response {indices[i]}"
            if value is None and allow_invalid:
                checked.append(math.nan)
                continue
            # A string holding a number is no number: float("7") would accept it, so ask for __float__.
            if isinstance(value, (str, bytes)) or not hasattr(type(value), "__float__"):
                extra = hint if value is None else ""
                raise ModpoError(f"{where}: {at}: score {_short(value)} is not a number{extra}")
            overflowed = False
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float (10**400): beyond float32 all the more
                number, overflowed = (math.inf if value > 0 else -math.inf), True
            if not math.isfinite(number) or abs(number) > FLOAT32_MAX:  # scores are stored as float32
                if not allow_invalid:
                    beyond = f"{_short(value) if overflowed else f'{number:g}'} is beyond float32 (inf)"
                    detail = beyond if overflowed or math.isfinite(number) else f"is {number}"
                    raise ModpoError(f"{where}: {at}: score {detail}{hint}")
                number = math.nan
            checked.append(number)
        return checked


# The largest score that float32 (the stored type) holds: anything beyond would be stored as inf. (A value
# within half a unit above still rounds to it, but no score is that close to 3.4e38 by accident.)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _score_list(values: Any, where: str) -> list[Any]:
    """A callable's scores as a list: a list or tuple, or a 1-D array or tensor. Anything else iterable (a
    dict's keys, a set's arbitrary order, a 2-D array's rows) would be read as scores silently, so it is refused."""
    expected = "expected a list of floats (one per response) or a 1-D array"
    if isinstance(values, (list, tuple)):
        return list(values)
    if isinstance(values, (np.ndarray, torch.Tensor)):
        if values.ndim != 1:
            raise ModpoError(f"{where} returned a {values.ndim}-D array of shape {tuple(values.shape)}, {expected}")
        return values.tolist()
    raise ModpoError(f"{where} returned {type(values).__name__}, {expected}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CallableReward(Reward):
    def __init__(self, name: str, spec: str):
        super().__init__(name, spec)
        self.fn, self.source = load_callable(spec[len("py:"):], f"reward {name!r}")
        self.bounds = declared_bounds(self.fn, f"reward {name!r} ({spec})")

    def fingerprint(self) -> str:
        if self.source and Path(self.source).is_file():
            return storage.sha256_file(Path(self.source))[:32]
        return "callable:" + self.spec

    def _score_batch(self, inputs: Sequence[RewardInput]) -> list[float]:
        try:
            values = self.fn([x.prompt for x in inputs], [x.response for x in inputs])
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too: sys.exit(0) in a reward must not end the stage with 0
            raise ModpoError(f"reward {self.name!r} ({self.spec}) raised {_describe(e)}") from e
        closed = reopen_closed_streams()
        if closed:  # else the next thing to print (loading the reference) failed, and was blamed
            raise ModpoError(f"reward {self.name!r} ({self.spec}) closed sys.{closed}, which the rest of the process "
                             "writes to: a reward must leave the process's streams open")
        return values


class ModelReward(Reward):
    def __init__(self, name: str, spec: str, *, dtype: torch.dtype, device: torch.device,
                 trust_remote_code: bool, max_length: int = 4096):
        from modpo_pipe import models

        super().__init__(name, spec)
        self.model, self.tokenizer = models.load_reward_model(
            spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code, what=f"reward {name!r}"
        )
        self.device = device
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))
        self._fingerprint = models.fingerprint(spec)
        self.truncated: list[bool] = []  # per input of the last score() call: cut to fit max_length

    def fingerprint(self) -> str:
        return self._fingerprint

    def batch_order(self, inputs: Sequence[RewardInput]) -> list[int]:
        # Similar lengths side by side: a pad-to-longest batch of mixed lengths is mostly padding (0.54 real
        # tokens in the benchmark's workload in input order). The conversation's characters stand in for its
        # tokens; the template adds about the same to every input, so nothing is rendered twice.
        lengths = [len(x.response) + sum(len(m["content"]) for m in x.messages) for x in inputs]
        return sorted(range(len(inputs)), key=lengths.__getitem__)

    def render(self, x: RewardInput) -> str:
        conversation = [*x.messages, {"role": "assistant", "content": x.response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(m["content"] for m in conversation)

    def encode(self, texts: list[str], **kwargs: Any) -> Any:
        # A chat template already writes the special tokens; plain text gets the tokenizer's own.
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(texts, add_special_tokens=not has_template, **kwargs)

    def fit(self, x: RewardInput, where: str) -> RewardInput:
        """`x` as it fits the model's max_length: the response whole, the cut taken from the start of the prompt
        (see prompts.fit_messages); a response that does not fit alone is an error."""
        from modpo_pipe.prompts import fit_messages

        def length(messages: list[dict[str, str]]) -> int:
            return len(self.encode([self.render(RewardInput(messages, x.response))])["input_ids"][0])

        try:
            if length(x.messages) <= self.max_length:
                return x
        except TemplateError as e:  # real templates refuse roles that do not alternate, or a system message
            raise ModpoError(f"reward {self.name!r} ({self.spec}): {where}: the reward model's chat template "
                             f"refuses this conversation: {e}") from None
        messages = fit_messages(x.messages, length, self.max_length, self.tokenizer)
        if messages is None:
            raise ModpoError(f"reward {self.name!r} ({self.spec}): {where}: the response alone is longer than the "
                             f"reward model's {self.max_length} tokens; it cannot be scored whole")
        return RewardInput(messages, x.response)

    def score(self, inputs: Sequence[RewardInput], batch_size: int, progress: bool = False, *,
              labels: Sequence[str] | None = None, allow_invalid: bool = False, invalid_hint: str = "") -> list[float]:
        """As Reward.score, on inputs cut to fit first; `self.truncated` then says, per input, whether it was."""
        fitted = [self.fit(x, labels[i] if labels is not None else f"response {i}") for i, x in enumerate(inputs)]
        self.truncated = [f is not x for f, x in zip(fitted, inputs)]
        return super().score(fitted, batch_size, progress, labels=labels, allow_invalid=allow_invalid,
                             invalid_hint=invalid_hint)

    @torch.inference_mode()
    def _score_batch(self, inputs: Sequence[RewardInput]) -> list[float]:
        # Right padding, so every position id is what the text has alone. Decoder heads (`score`, applied at
        # every position) are read at each row's last real token, found from the attention mask: the model's own
        # pooling looks for the last token that is not config.pad_token_id, which is one token early when pad ==
        # EOS and the text ends in EOS, and lands on padding when the two pad ids differ. Encoder heads pool the
        # first token, which padding on the right never moves.
        encoded = self.encode([self.render(x) for x in inputs], return_tensors="pt", padding=True,
                              padding_side="right")
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        head, captured = getattr(self.model, "score", None), []
        hook = head.register_forward_hook(lambda _m, _i, out: captured.append(out)) if head is not None else None
        try:
            logits = self.model(**encoded).logits
        finally:
            if hook is not None:
                hook.remove()
        if captured:
            mask = encoded["attention_mask"]
            last = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(1)
            logits = captured[-1][torch.arange(len(last), device=mask.device), last]
        return logits[:, 0].float().cpu().tolist()


def load_callable(target: str, what: str) -> tuple[Callable, str | None]:
    """`package.module:function` or `path/to/file.py:function` -> (function, its source file)."""
    module_name, sep, function_name = target.rpartition(":")
    if not sep or not module_name or not function_name:
        raise ModpoError(f"{what}: expected py:module:function or py:file.py:function, got py:{target}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ModpoError(f"{what}: {path}: no such file")
            # A unique module name per file, registered before it runs (as `import` does): dataclasses and
            # pickling look their module up in sys.modules.
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            name = f"modpo_reward_{path.stem}_{digest}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            module = importlib.import_module(module_name)
    except (ModpoError, KeyboardInterrupt):
        raise
    except BaseException as e:  # SystemExit too: a module that exits on import
        raise ModpoError(f"{what}: cannot import {module_name}: {_describe(e)}") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ModpoError(f"{what}: {module_name} has no function {function_name!r}")
    return fn, getattr(module, "__file__", None)


def declared_bounds(fn: Callable, where: str) -> tuple[float, float] | None:
    """`fn.bounds`, the (low, high) its scores lie in, if it declares them."""
    bounds = getattr(fn, "bounds", None)
    if bounds is None:
        return None
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or isinstance(bounds, (str, bytes)):
        raise ModpoError(f"{where}: its `bounds` attribute must be (low, high), two finite numbers with low < high; "
                         f"got {_short(bounds)}")
    return low, high


def reopen_closed_streams() -> str:
    """The first of sys.stdout and sys.stderr that is closed ("" if neither), each closed one replaced by a new
    stream on its file descriptor, so that the error saying so can still be printed."""
    closed = ""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(getattr(sys, name), "closed", False):
            closed = closed or name
            setattr(sys, name, os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace"))
    return closed


def _describe(e: BaseException) -> str:
    """`Type: first line of the message`, on one line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_reward(name: str, spec: str, *, dtype: torch.dtype, device: torch.device,
                trust_remote_code: bool) -> Reward:
    if spec.startswith("py:"):
        return CallableReward(name, spec)
    return ModelReward(name, spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def reward_inputs(prompt_messages: Sequence[list[dict[str, str]]], responses: Sequence[str]) -> list[RewardInput]:
    return [RewardInput(m, r) for m, r in zip(prompt_messages, responses)]
