"""Reward specs: a sequence-classification model (its single logit is the reward), a Python callable, or a
served reward model.

    helpful  = "path/or/hub-id"                      a model, reading prompt + response through ITS OWN
                                                      tokenizer and chat template
    concise  = "py:package.module:function"          a callable (prompts, responses) -> list[float], or a
    positive = "py:path/to/file.py:function"         TRL reward function (prompts, completions, **kwargs)
    judge    = "http://host:8000/score#revision=v3"  a served model (reward_http.py), also vLLM's
                                                      "vllm+http://host:8000/classify"

A callable may declare the range its scores lie in as an attribute, `function.bounds = (low, high)`: `eval`
records it, and `front` measures hypervolume from the low bounds (a fixed point, the same for every front).

A `py:` spec runs code the user chose: it is imported and called like any other Python they run.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm

from modpo_pipe import reward_http, storage
from modpo_pipe.errors import ModpoError


@dataclass
class RewardInput:
    messages: list[dict[str, str]]  # the conversation before the response, un-rendered
    response: str
    # Whether the prompt was a chat (a TRL-style callable then gets message lists); None: judged from `messages`
    # (files written before prompt_format was recorded): a single user turn was plain text.
    chat: bool | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # the prompt row's other fields
    response_ids: list[int] | None = None  # the sampled ids of the response

    @property
    def prompt(self) -> str:
        """What a callable sees as the prompt: the last user turn (for plain prompts, the prompt itself)."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]

    @property
    def is_chat(self) -> bool:
        if self.chat is not None:
            return self.chat
        return not (len(self.messages) == 1 and self.messages[0]["role"] == "user")


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
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        scores: list[float] = [math.nan] * len(inputs)
        for chunk, values in zip(chunks, self._score_batches([[inputs[i] for i in c] for c in chunks], progress)):
            checked = self._check(values, chunk, labels=labels, allow_invalid=allow_invalid,
                                  invalid_hint=invalid_hint)
            for i, value in zip(chunk, checked):
                scores[i] = value
        return scores

    def batch_order(self, inputs: Sequence[RewardInput]) -> list[int]:
        """The order inputs are batched in (scores come back in input order whatever it is)."""
        return list(range(len(inputs)))

    def _score_batches(self, batches: list[list[RewardInput]], progress: bool) -> Iterable[Any]:
        """Each batch's raw scores, in order: one batch after the other (a served reward asks several at once)."""
        for batch in tqdm(batches, desc=f"reward {self.name}", unit="batch", disable=not progress):
            yield self._score_batch(batch)

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
    """A `py:` callable, called by its signature: `(prompts, responses)` (modpo-pipe's: the last user turn and the
    response, as strings), or TRL's reward-function form (a `completions` parameter or **kwargs), called as TRL's
    GRPOTrainer calls it (see call_trl)."""

    def __init__(self, name: str, spec: str):
        super().__init__(name, spec)
        self.fn, self.source = load_callable(spec[len("py:"):], f"reward {name!r}")
        self.bounds = declared_bounds(self.fn, f"reward {name!r} ({spec})")

    @functools.cached_property
    def convention(self) -> tuple[bool, set[str] | None]:
        """(whether fn is a TRL reward function, the keyword names it accepts: None for any); trl_convention."""
        return trl_convention(self.fn)

    @property
    def trl(self) -> bool:
        return self.convention[0]

    def fingerprint(self) -> str:
        if self.source and Path(self.source).is_file():
            return storage.sha256_file(Path(self.source))[:32]
        return "callable:" + self.spec

    def _score_batch(self, inputs: Sequence[RewardInput]) -> list[float]:
        kwargs = self.trl_arguments(inputs) if self.trl else None
        try:
            if kwargs is None:
                values = self.fn([x.prompt for x in inputs], [x.response for x in inputs])
            else:
                values = self.fn(**kwargs)
            if inspect.isawaitable(values):  # an `async def` reward, as TRL allows
                values = asyncio.run(_awaited(values))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too: sys.exit(0) in a reward must not end the stage with 0
            raise ModpoError(f"reward {self.name!r} ({self.spec}) raised {_describe(e)}") from e
        closed = reopen_closed_streams()
        if closed:  # else the next thing to print (loading the reference) failed, and was blamed
            raise ModpoError(f"reward {self.name!r} ({self.spec}) closed sys.{closed}, which the rest of the process "
                             "writes to: a reward must leave the process's streams open")
        return values

    def trl_arguments(self, inputs: Sequence[RewardInput]) -> dict[str, Any]:
        """The keyword arguments TRL's GRPOTrainer passes a reward function, from what a pairs file holds:
        `prompts` and `completions` (strings for plain prompts; for chats the conversation and
        [{"role": "assistant", "content": response}]), `completion_ids` (the sampled ids), and every other column
        of the prompt row, one value per completion. TRL's trainer_state, log_extra and log_metric have no
        counterpart here and are not passed. A function without **kwargs gets only the ones it names."""
        where = f"reward {self.name!r} ({self.spec})"
        chats = {x.is_chat for x in inputs}
        if len(chats) > 1:  # (score refuses a mixed file first; this guards other callers)
            raise ModpoError(f"{where}: a batch mixes plain prompts and chats; a TRL reward function takes one or "
                             "the other")
        if chats == {True}:
            prompts: list[Any] = [x.messages for x in inputs]
            completions: list[Any] = [[{"role": "assistant", "content": x.response}] for x in inputs]
        else:
            prompts, completions = [x.prompt for x in inputs], [x.response for x in inputs]
        kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions}
        if all(x.response_ids is not None for x in inputs):
            kwargs["completion_ids"] = [x.response_ids for x in inputs]
        for name in dict.fromkeys(k for x in inputs for k in x.columns):
            if name in TRL_OWN_COLUMNS:  # TRL leaves these dataset columns out too
                continue
            if name in kwargs:
                raise ModpoError(f"{where}: the prompts have a column {name!r}, the name of an argument a TRL reward "
                                 "function gets for itself; rename the column")
            kwargs[name] = [x.columns.get(name) for x in inputs]
        accepts = self.convention[1]
        if accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepts}
        return kwargs


# Dataset columns TRL's GRPOTrainer does not pass to reward functions (it passes its own completions instead).
TRL_OWN_COLUMNS = ("completion", "completion_ids")


def trl_convention(fn: Callable) -> tuple[bool, set[str] | None]:
    """Whether `fn` is a TRL reward function (it names `completions`, or takes **kwargs and no `responses`), and
    the keyword names it accepts (None: any, it has **kwargs). Without a readable signature: modpo-pipe's form."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False, None
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in parameters)
    trl = "completions" in names or (var_keyword and "responses" not in names)
    return trl, None if var_keyword else names


async def _awaited(value: Any) -> Any:
    return await value


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


class ServedReward(Reward):
    """A reward model behind an HTTP endpoint (see reward_http.py for the specs and the JSON)."""

    def __init__(self, name: str, spec: str, options: reward_http.HttpOptions | None = None):
        super().__init__(name, spec)
        self.endpoint = reward_http.parse_spec(spec, f"reward {name!r}")
        self.client = reward_http.Client(self.endpoint, options or reward_http.HttpOptions(),
                                         f"reward {name!r} (served at {self.endpoint.url})")

    def fingerprint(self) -> str:
        return self.endpoint.fingerprint()

    def _score_batches(self, batches: list[list[RewardInput]], progress: bool) -> Iterable[Any]:
        return self.client.score([[(x.messages, x.response, x.prompt) for x in batch] for batch in batches])


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


def load_reward(name: str, spec: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool,
                http: reward_http.HttpOptions | None = None) -> Reward:
    """The reward a spec names; `http`: how a served one is asked ([score].http_*; defaults without)."""
    if spec.startswith("py:"):
        return CallableReward(name, spec)
    if reward_http.is_served(spec):
        return ServedReward(name, spec, http)
    return ModelReward(name, spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def reward_inputs(prompt_messages: Sequence[list[dict[str, str]]], responses: Sequence[str], *,
                  chat: bool | None = None, columns: Sequence[dict[str, Any]] | None = None,
                  response_ids: Sequence[list[int]] | None = None) -> list[RewardInput]:
    """One input per response; `columns` and `response_ids` run alongside (one entry per response)."""
    return [RewardInput(m, r, chat, columns[i] if columns is not None else {},
                        list(response_ids[i]) if response_ids is not None else None)
            for i, (m, r) in enumerate(zip(prompt_messages, responses, strict=True))]
