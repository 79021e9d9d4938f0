"""Served reward models: `http://` specs in modpo-pipe's JSON and `vllm+http://` specs in vLLM's, against
real HTTP servers started here (http.server in a thread; no mock of the HTTP layer). The servers score with the tiny
reward model in-process, so a served reward must give what the local one gives."""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, fails, fork_cli, generate_settings, kill_when, ok

from modpo_pipe import parts, schema
from modpo_pipe.config import RunSettings, ScoreSettings
from modpo_pipe.errors import ModpoError
from modpo_pipe.reward_http import parse_spec
from modpo_pipe.rewards import ModelReward, RewardInput

CPU = torch.device("cpu")


class RewardServer:
    """A reward server in a thread of this process: modpo-pipe's JSON at /score, vLLM's at /classify and /pooling
    (as `vllm serve` answers them), scoring with a reward model loaded here, one request at a time. The test sets
    how it misbehaves: `fail_first` requests answered 503, `slow_first` ones answered after `slow_seconds`,
    `answer` a function (path, payload) -> (status, body) replacing the right answer, `hold_after` N: requests
    after the N-th wait until release()."""

    def __init__(self, model_dir: Path):
        self.model = ModelReward("served", str(model_dir), dtype=torch.float32, device=CPU, trust_remote_code=False)
        self.requests: list[tuple[str, dict, dict]] = []  # (path, payload, headers) in order of arrival
        self.fail_first = self.slow_first = 0
        self.slow_seconds = 0.0
        self.answer = None
        self.hold_after: int | None = None
        self.released = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, payload, dict(self.headers)))
                    n = len(server.requests)
                if server.hold_after is not None and n > server.hold_after:
                    server.released.wait(60)
                if n <= server.slow_first:
                    time.sleep(server.slow_seconds)
                status, body = (503, b"busy") if n <= server.fail_first else (
                    server.answer or server.respond)(self.path, payload)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (a timeout, a killed process)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, path: str, payload: dict) -> tuple[int, bytes]:
        if path == "/score":  # modpo-pipe's JSON
            inputs = [RewardInput(x["messages"], x["response"]) for x in payload["inputs"]]
            return 200, json.dumps({"scores": self.scores(inputs)}).encode()
        # vLLM: a conversation rendered with the model's own chat template, or texts tokenised as they are
        if "messages" in payload:
            *before, reply = payload["messages"]
            assert reply["role"] == "assistant"
            logits = self.scores([RewardInput(before, reply["content"])])
        else:
            logits = [self.text_logit(text) for text in payload["input"]]
        if payload.get("use_activation") is not False:  # vLLM's default: a sigmoid over the one label
            logits = [1 / (1 + np.exp(-x)) for x in logits]
        rows = [{"index": i, "object": "classification", "label": "LABEL_0", "probs": [x], "num_classes": 1}
                if path == "/classify" else {"index": i, "object": "pooling", "data": [x]}
                for i, x in enumerate(logits)]
        return 200, json.dumps({"id": "x", "object": "list", "created": 0, "model": "tiny",
                                "data": rows[::-1],  # (in any order: the index says which input)
                                "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()

    def scores(self, inputs: list[RewardInput]) -> list[float]:
        with self.lock:  # (the model's forward hook is not for two threads at once)
            return self.model.score(inputs, batch_size=len(inputs))

    def text_logit(self, text: str) -> float:
        with self.lock, torch.inference_mode():
            encoded = self.model.tokenizer([text], add_special_tokens=True, return_tensors="pt")
            return float(self.model.model(**encoded).logits[0, 0])

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory) -> Path:
    """pairs.parquet of 6 prompts x 4 responses, and a reward model without a chat template beside the tiny one."""
    work = tmp_path_factory.mktemp("served")
    (work / "modpo.toml").write_text(generate_settings(tiny, 4, score=ScoreSettings(reward_batch_size=4)))
    ok(["generate", tiny.prompts, "--out", "pairs.parquet"], work)
    plain = work / "plain-reward"
    shutil.copytree(tiny.reward, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    return work


@pytest.fixture
def server(tiny):
    server = RewardServer(tiny.reward)
    yield server
    server.close()


def score(env: Path, out: Path, spec: str, *extra) -> np.ndarray:
    """`score` with the one reward `rm`; its scores, flat."""
    ok(["score", "pairs.parquet", "--out", out, "--reward", f"rm={spec}", *extra], env)
    table, _ = schema.read_table(out, "scored")
    return np.array([v for row in table.column("reward_rm").to_pylist() for v in row])


@pytest.fixture(scope="module")
def local(env, tiny) -> np.ndarray:
    return score(env, env / "local.parquet", str(tiny.reward))


def test_served_scores_are_the_local_models(env, local, server, tmp_path):
    responses = len(local)
    for spec, path, requests in [(f"{server.url}/score#revision=t1", "/score", responses // 4),
                                 (f"vllm+{server.url}/classify#revision=t1", "/classify", responses),
                                 (f"vllm+{server.url}/pooling", "/pooling", responses)]:
        server.requests.clear()
        served = score(env, tmp_path / "scored.parquet", spec)
        np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5)
        assert [p for p, _, _ in server.requests] == [path] * requests, spec
    # modpo-pipe's JSON: a batch per request, each input with its prompt, conversation and response
    server.requests.clear()
    score(env, tmp_path / "scored.parquet", f"{server.url}/score#revision=t1")
    payload = server.requests[0][1]
    assert payload["revision"] == "t1" and len(payload["inputs"]) == 4
    assert set(payload["inputs"][0]) == {"prompt", "messages", "response"}
    assert payload["inputs"][0]["messages"][-1] == {"role": "user", "content": payload["inputs"][0]["prompt"]}


def test_vllm_text_input_is_the_local_model_without_a_chat_template(env, server, tmp_path):
    local = score(env, tmp_path / "local.parquet", str(env / "plain-reward"))
    served = score(env, tmp_path / "served.parquet", f"vllm+{server.url}/classify#input=text&revision=t1")
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5)
    assert all(len(payload["input"]) == 4 and payload["use_activation"] is False
               for _, payload, _ in server.requests)


@pytest.mark.slow
def test_a_server_that_fails_the_first_attempts_is_survived(env, local, server, tmp_path):
    server.fail_first = 2  # 503 twice, then answers
    served = score(env, tmp_path / "scored.parquet", f"{server.url}/score", "--http-concurrency", 1)
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5)
    assert len(server.requests) == len(local) // 4 + 2
    # a first answer later than the timeout: asked again
    server.requests.clear()
    # (the timeout is ample for the other answers, even on a loaded machine: only the first one is asked twice)
    server.fail_first, server.slow_first, server.slow_seconds = 0, 1, 30.0
    served = score(env, tmp_path / "scored-2.parquet", f"{server.url}/score", "--http-concurrency", 1,
                   "--http-timeout", 5)
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5)
    assert len(server.requests) == len(local) // 4 + 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANSWERS = {
    "no JSON": (lambda p, x: (200, b"<html>oops</html>"), "answered no JSON: '<html>oops</html>'"),
    "wrong count": (lambda p, x: (200, b'{"scores": [1.0]}'), "answered 1 scores for 4 inputs"),
    "no scores": (lambda p, x: (200, b'{"rewards": [1, 2, 3, 4]}'), 'answered no {"scores": [...]}'),
    "not numbers": (lambda p, x: (200, b'{"scores": ["1", 2, 3, 4]}'), "a score that is no number: 1"),
    "refusal": (lambda p, x: (400, b'{"error": "too long"}'), 'refused the request: HTTP 400 Bad Request: '
                                                              '{"error": "too long"}'),
    "server error": (lambda p, x: (500, b"boom"), "answered HTTP 500 Internal Server Error: boom (2 attempts:"),
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_a_bad_answer_is_one_line_naming_the_endpoint(env, server, tmp_path, case):
    server.answer, fragment = ANSWERS[case]
    out = tmp_path / "scored.parquet"
    line = fails(["score", "pairs.parquet", "--out", out, "--reward", f"rm={server.url}/score",
                  "--http-retries", 1], fragment, cwd=env)
    assert line.startswith(f"error: reward 'rm' (served at {server.url}/score): "), line
    assert not out.exists()


def test_a_vllm_answer_of_several_labels_is_refused(env, server, tmp_path):
    server.answer = lambda p, x: (200, json.dumps({"data": [{"index": 0, "probs": [0.1, 0.9]}]}).encode())
    fails(["score", "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward", f"rm=vllm+{server.url}/classify"],
          "answered 2 values for one input, a reward model one", cwd=env)


def test_a_refused_connection_is_one_line_naming_the_endpoint(env, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/score"
    fails(["score", "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward", f"rm={url}", "--http-retries", 1],
          f"reward 'rm' (served at {url}): cannot reach it: [Errno 111] Connection refused (2 attempts:", cwd=env)


@pytest.mark.slow
def test_score_resumes_after_a_kill_without_asking_for_finished_chunks(env, local, server, tmp_path):
    out = tmp_path / "scored.parquet"
    args = ["score", "pairs.parquet", "--out", out, "--shard-size", 2, "--reward", f"rm={server.url}/score"]
    server.hold_after = 4  # 3 chunks of 2 groups (8 responses, 2 requests each): the third chunk waits
    pid = fork_cli(args, env)
    assert kill_when(pid, lambda: len(server.requests) > 4, delay=0.2)
    assert sorted(p.name for p in parts.work_dir(out).glob("reward-*")) == [
        "reward-rm-00000.parquet", "reward-rm-00001.parquet"]
    server.release()
    asked = len(server.requests)
    output = ok(args, env)
    assert len(server.requests) - asked == 2  # the unfinished chunk's two requests, nothing else
    assert "parts reused from a killed run: 2" in output
    resumed, _ = schema.read_table(out, "scored")
    np.testing.assert_allclose([v for row in resumed.column("reward_rm").to_pylist() for v in row], local,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_fingerprint_is_the_endpoint_and_revision(env, server, tmp_path):
    def fingerprint(spec: str, *extra) -> str:
        out = tmp_path / "scored.parquet"
        ok(["score", "pairs.parquet", "--out", out, "--reward", f"rm={spec}", *extra], env)
        return schema.read_metadata(out)["rewards"]["rm"]["fingerprint"]

    one = fingerprint(f"{server.url}/score#revision=a")
    assert fingerprint(f"{server.url}/score#revision=a", "--http-timeout", 5, "--http-concurrency", 2) == one
    assert fingerprint(f"{server.url}/score#revision=b") != one
    assert parse_spec(f"{server.url}/score#revision=a", "r").fingerprint() == one
    # parts of a killed run with another revision are not reused: the run refuses them
    out = tmp_path / "killed.parquet"
    args = ["score", "pairs.parquet", "--out", out, "--shard-size", 2]
    server.hold_after = len(server.requests) + 2
    pid = fork_cli([*args, "--reward", f"rm={server.url}/score#revision=a"], env)
    assert kill_when(pid, lambda: len(server.requests) > server.hold_after, delay=0.2)
    server.release()
    fails([*args, "--reward", f"rm={server.url}/score#revision=b"], "(it differs in: rewards)", cwd=env)


def test_an_api_key_comes_from_the_environment(env, server, tmp_path, monkeypatch):
    spec = f"{server.url}/score#api_key_env=MODPO_TEST_KEY"
    fails(["score", "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward", f"rm={spec}"],
          "api_key_env=MODPO_TEST_KEY: no such environment variable", cwd=env)
    monkeypatch.setenv("MODPO_TEST_KEY", "sesame")
    score(env, tmp_path / "s.parquet", spec)
    assert {headers["Authorization"] for _, _, headers in server.requests} == {"Bearer sesame"}


@pytest.mark.parametrize(("spec", "fragment"), [
    ("http://h:8000/score#revison=a", "unknown option 'revison' after '#' (options: revision, input, api_key_env)"),
    ("http://h:8000/score#input=text", "input= is chat or text, and only for vllm+ endpoints"),
    ("vllm+http://h:8000/v1/chat", "a vllm+ endpoint ends in /classify or /pooling"),
    ("vllm+http://h:8000/classify#input=tokens", "input= is chat or text"),
    ("http://h:port/score", "Port could not be cast to integer value"),
    ("http:///score", "names no host"),
    ("https://me:secret@h/score", "holds no credentials (they would be written into every scored file)"),
])
def test_malformed_specs_are_refused_with_the_settings(env, spec, fragment, tmp_path):
    line = fails(["score", "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward", f"rm={spec}"], fragment,
                 cwd=env)
    assert line.startswith("error: [score.rewards].rm: "), line
    with pytest.raises(ModpoError, match=re.escape(fragment)):
        parse_spec(spec, "reward 'rm'")


def test_no_answer_within_the_timeout_is_one_line(env, server, tmp_path):
    server.slow_first, server.slow_seconds = 1, 3.0
    fails(["score", "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward", f"rm={server.url}/score",
           "--http-timeout", 0.5, "--http-retries", 0],
          f"reward 'rm' (served at {server.url}/score): no answer within 0.5 s ([score].http_timeout) "
          "(1 attempt, no retries: [score].http_retries)", cwd=env)


def test_rounds_redo_score_for_another_revision_only(env, server, tiny):
    """A run directory fingerprints a served reward by its endpoint and revision: another revision is a settings
    change (exit 78, naming score), how patiently it is asked is none."""
    from modpo_pipe.rounds import EXIT_CONFIG_CHANGED

    run = env / "run"
    run.mkdir()

    def settings(revision: str, timeout: float = 60.0) -> None:
        score = ScoreSettings(reward_batch_size=4, http_timeout=timeout,
                              rewards={"rm": f"{server.url}/score#revision={revision}"})
        (run / "modpo.toml").write_text(generate_settings(
            tiny, 4, score=score, run=RunSettings(rounds=1, prompts=str(tiny.prompts), prompts_per_round=2)))

    settings("a")
    ok(["run", "--workdir", run, "--max-stages", 2])
    asked = len(server.requests)
    settings("a", timeout=5.0)
    assert not json.loads(ok(["status", "--workdir", run, "--json"]))["config_changed"]
    settings("b")
    result = cli(["run", "--workdir", run])
    assert result.exit_code == EXIT_CONFIG_CHANGED, result.output
    assert "round-000 score: score.rewards" in result.output
    assert len(server.requests) == asked  # nothing was asked again
