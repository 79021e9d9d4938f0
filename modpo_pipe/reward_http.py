"""Served reward models: a reward spec that is a URL. Batches of (prompt, response) are posted to it and one score
per response read back, with a small thread pool, retries and one-line errors naming the endpoint. The standard
library only (urllib): nothing to install to ask a server.

    judge = "http://host:8000/score#revision=v3"           modpo-pipe's own JSON (below), any server
    rm    = "vllm+http://host:8000/classify#revision=v3"   `vllm serve` of a sequence-classification model
    rm    = "vllm+http://host:8000/pooling#revision=v3"    ... through its /pooling endpoint

The fragment (after `#`) is never sent; `&`-separated options:
    revision=TEXT     the model behind the endpoint, as you name it (a commit, a tag, a date). It is part of the
                      reward's fingerprint with the URL: scored parts and finished rounds are reused only for the
                      same URL and revision, so change it when the served model changes.
    input=chat|text   vllm+ only. chat (default): one conversation per request ({"messages": ...}), rendered by
                      the server with the model's own chat template, as a local reward model renders it. text: the
                      conversation's contents joined by newlines, a batch per request ({"input": [...]}), for
                      models without a chat template (as modpo-pipe renders them in-process).
    api_key_env=NAME  send `Authorization: Bearer <the value of environment variable NAME>` (the key itself never
                      goes into the spec, which files and run manifests record).

modpo-pipe's JSON, one POST (Content-Type: application/json) per batch of [score].reward_batch_size responses:
    request  {"inputs": [{"prompt": "the last user turn", "messages": [{"role": ..., "content": ...}, ...],
                          "response": "..."}, ...],
              "revision": "v3"}                   (revision: only when the spec gives one)
    answer   {"scores": [0.73, -1.2, ...]}        one number (or null) per input, in order

vLLM (`vllm serve MODEL` of a sequence-classification model; the request and response types of its
vllm/entrypoints/pooling, as of vLLM 0.32, whose CPU build served the tiny test model with the local scores):
    /classify  request {"messages": [...conversation, {"role": "assistant", "content": response}],
                        "use_activation": false}            or, input=text, {"input": [...], "use_activation": false}
               answer  {"data": [{"index": 0, "probs": [logit], "num_classes": 1, ...}], ...}
    /pooling   the same requests; answer {"data": [{"index": 0, "data": [logit]}, ...]}
use_activation false asks for the raw logit (vLLM's default would apply a sigmoid), which is what a local model gives.

How patiently to ask is in the settings, not the spec ([score].http_timeout, http_retries, http_concurrency), so
changing it never changes a reward's identity. 5xx answers, timeouts and failed connections are retried with
backoff (0.5 s, 1 s, 2 s ... at most 30 s); a 4xx answer, an answer that is no JSON or has the wrong shape or
count are errors at once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from modpo_pipe.errors import ModpoError

SCHEMES = {"http": "modpo", "https": "modpo", "vllm+http": "vllm", "vllm+https": "vllm"}
VLLM_PATHS = ("/classify", "/pooling")
OPTIONS = ("revision", "input", "api_key_env")
MAX_BACKOFF = 30.0


def is_served(spec: str) -> bool:
    return spec.split("://", 1)[0] in SCHEMES and "://" in spec


@dataclass(frozen=True)
class Endpoint:
    url: str  # what is posted to: the spec without its fragment, and without vllm+
    protocol: str  # "modpo" or "vllm"
    revision: str = ""
    input: str = "chat"  # vllm: "chat" (one conversation a request) or "text" (a batch of joined texts)
    api_key_env: str = ""

    def fingerprint(self) -> str:
        """What the scores depend on: the endpoint, what is asked and the revision the user vouches for."""
        identity = {"url": self.url, "protocol": self.protocol, "revision": self.revision, "input": self.input}
        return "served:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def parse_spec(spec: str, what: str) -> Endpoint:
    """`spec` as an Endpoint, or a one-line error naming `what` (e.g. "reward 'judge'")."""
    scheme, _, _ = spec.partition("://")
    if scheme not in SCHEMES:
        raise ModpoError(f"{what}: {spec!r} is no served reward (http://, https://, vllm+http:// or vllm+https://)")
    parts = urllib.parse.urlsplit(spec.removeprefix("vllm+"))
    if not parts.hostname:
        raise ModpoError(f"{what}: {spec!r} names no host")
    if parts.username or parts.password:  # the spec is written into every scored file and run manifest
        raise ModpoError(f"{what}: a served reward's URL holds no credentials (they would be written into every "
                         "scored file); give a key through #api_key_env=NAME")
    try:
        parts.port  # noqa: B018 (a port that is no number raises here)
        options = urllib.parse.parse_qsl(parts.fragment, keep_blank_values=True, strict_parsing=bool(parts.fragment))
    except ValueError as e:
        raise ModpoError(f"{what}: {spec!r}: {e}") from None
    given = dict(options)
    unknown = [k for k in given if k not in OPTIONS]
    if unknown or len(given) < len(options):
        problem = f"unknown option {unknown[0]!r}" if unknown else "an option given twice"
        raise ModpoError(f"{what}: {spec!r}: {problem} after '#' (options: {', '.join(OPTIONS)})")
    protocol = SCHEMES[scheme]
    endpoint = Endpoint(parts._replace(fragment="").geturl(), protocol, given.get("revision", ""),
                        given.get("input", "chat"), given.get("api_key_env", ""))
    if protocol == "vllm" and not parts.path.rstrip("/").endswith(VLLM_PATHS):
        raise ModpoError(f"{what}: {spec!r}: a vllm+ endpoint ends in {' or '.join(VLLM_PATHS)} (e.g. "
                         f"vllm+http://{parts.netloc}/classify)")
    if endpoint.input not in ("chat", "text") or (protocol == "modpo" and "input" in given):
        raise ModpoError(f"{what}: {spec!r}: input= is chat or text, and only for vllm+ endpoints")
    return endpoint


@dataclass(frozen=True)
class HttpOptions:
    timeout: float = 60.0  # seconds for one answer
    retries: int = 4  # after the first attempt, on 5xx, timeouts and failed connections
    concurrency: int = 4  # requests in flight


def options(score_settings: Any) -> HttpOptions:
    """The [score].http_* settings."""
    return HttpOptions(score_settings.http_timeout, score_settings.http_retries, score_settings.http_concurrency)


# One input: (the conversation before the response, the response, the last user turn).
Item = tuple[list[dict[str, str]], str, str]


@dataclass
class Request:
    payload: dict[str, Any]
    n: int  # the inputs it asks for


class Client:
    """Scores batches of Items at one endpoint; every error is one line starting with `what`."""

    def __init__(self, endpoint: Endpoint, options: HttpOptions, what: str):
        self.endpoint, self.options, self.what = endpoint, options, what
        # (checked here, where the key is needed, not with the settings: train and status never ask the server)
        if endpoint.api_key_env and endpoint.api_key_env not in os.environ:
            raise ModpoError(f"{what}: api_key_env={endpoint.api_key_env}: no such environment variable")

    def score(self, batches: Sequence[Sequence[Item]]) -> list[list[Any]]:
        """Each batch's scores, in order; up to `concurrency` requests in flight. The first error stops it: the
        requests not yet started are cancelled."""
        plan = [(b, request) for b, batch in enumerate(batches) for request in self.requests(batch)]
        scores: list[list[Any]] = [[] for _ in batches]
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="reward-http")
        try:
            answers = pool.map(lambda request: self.read(self.post(request.payload), request.n),
                               [request for _, request in plan])
            for (b, _), values in zip(plan, answers):
                scores[b] += values
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return scores

    def requests(self, batch: Sequence[Item]) -> list[Request]:
        e = self.endpoint
        if e.protocol == "modpo":
            payload: dict[str, Any] = {"inputs": [{"prompt": prompt, "messages": messages, "response": response}
                                                  for messages, response, prompt in batch]}
            if e.revision:
                payload["revision"] = e.revision
            return [Request(payload, len(batch))]
        if e.input == "text":  # as ModelReward renders for a model without a chat template
            texts = ["\n".join([*(m["content"] for m in messages), response]) for messages, response, _ in batch]
            return [Request({"input": texts, "use_activation": False}, len(batch))]
        return [Request({"messages": [*messages, {"role": "assistant", "content": response}],
                         "use_activation": False}, 1) for messages, response, _ in batch]

    def post(self, payload: dict[str, Any]) -> Any:
        """POST `payload` as JSON and return the decoded answer, retrying 5xx, timeouts and failed connections."""
        url, o = self.endpoint.url, self.options
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.endpoint.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.endpoint.api_key_env]}"
        for attempt in range(o.retries + 1):
            last = attempt == o.retries
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"),
                                            timeout=o.timeout) as answer:
                    text = answer.read()
                break
            except urllib.error.HTTPError as e:
                detail = _first_line(e.read())
                if e.code < 500:
                    raise ModpoError(f"{self.what}: refused the request: HTTP {e.code} {e.reason}"
                                     f"{': ' + detail if detail else ''}") from None
                failure = f"answered HTTP {e.code} {e.reason}{': ' + detail if detail else ''}"
            except TimeoutError:
                failure = f"no answer within {o.timeout:g} s ([score].http_timeout)"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, cut short
                reason = getattr(e, "reason", e)
                failure = f"cannot reach it: {reason}"
                if isinstance(reason, TimeoutError):
                    failure = f"no answer within {o.timeout:g} s ([score].http_timeout)"
            if last:
                attempts = f"{o.retries + 1} attempts" if o.retries else "1 attempt, no retries"
                raise ModpoError(f"{self.what}: {failure} ({attempts}: [score].http_retries)")
            time.sleep(min(MAX_BACKOFF, 0.5 * 2 ** attempt))
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise ModpoError(f"{self.what}: answered no JSON: {_first_line(text)!r}") from None

    def read(self, answer: Any, n: int) -> list[Any]:
        """The n scores of a decoded answer, or a one-line error saying what is wrong with it."""
        if self.endpoint.protocol == "modpo":
            scores = answer.get("scores") if isinstance(answer, dict) else None
            if not isinstance(scores, list):
                raise ModpoError(f'{self.what}: answered no {{"scores": [...]}}: {_short(answer)}')
        else:
            data = answer.get("data") if isinstance(answer, dict) else None
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise ModpoError(f'{self.what}: answered no vLLM {{"data": [...]}}: {_short(answer)}')
            data = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0)
            scores = [self.one_value(d) for d in data]
        if len(scores) != n:
            raise ModpoError(f"{self.what}: answered {len(scores)} scores for {n} inputs")
        for value in scores:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ModpoError(f"{self.what}: answered a score that is no number: {_short(value)}")
        return scores

    def one_value(self, item: dict[str, Any]) -> Any:
        """A vLLM answer's value for one input: its single logit (probs for /classify, data for /pooling)."""
        values = item.get("probs", item.get("data"))
        while isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
            values = values[0]  # [[x]]: /pooling of a model whose output keeps a token axis
        if not isinstance(values, list) or len(values) != 1:
            size = len(values) if isinstance(values, list) else "no list of"
            raise ModpoError(f"{self.what}: answered {size} values for one input, a reward model "
                             f"one (a classifier of several labels, or a token-level reward model?): {_short(item)}")
        return values[0]


def _first_line(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."
