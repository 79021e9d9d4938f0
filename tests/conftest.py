"""Tiny local models built on the spot: no hub, no network, a few seconds per test session."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import pyarrow as pa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POLICY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The reward model reads conversations through a different template, as real reward models do.
REWARD_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Human: {% else %}Bot: {% endif %}"
    "{{ m['content'] }}\n{% endfor %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "I love sunny days and I hate rain. Rainy days make me sad.",
    "Tell me a short story about a brave little robot who learns to paint.",
    "Explain why the sky is blue in one sentence.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Please write a kind note to a friend who is feeling down today.",
] * 20
PROMPTS = [
    "What is the capital of France?",
    "Tell me a story about a robot.",
    "Why is the sky blue?",
    "Write a kind note to a friend.",
    "Do you like rainy days?",
    "Count from one to five.",
]


def make_tokenizer(template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                      bos_token="<|endoftext|>")
    wrapped.chat_template = template
    return wrapped


def llama_config(vocab_size: int, pad_id: int, eos_id: int, **extra):
    from transformers import LlamaConfig

    # head_dim 32: a size vLLM's CPU attention supports, so the same fixtures serve the vLLM tests.
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                       pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, tie_word_embeddings=False,
                       **extra)


@dataclass
class TinyModels:
    root: Path
    policy: Path
    reward: Path
    reward_fn: str  # a py: spec
    prompts: Path


def build_tiny_models(root: Path, seed: int = 0) -> TinyModels:
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(POLICY_TEMPLATE)
    policy_dir = root / "policy"
    model = LlamaForCausalLM(llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id))
    with torch.no_grad():
        # Make the end-of-turn token likely enough that short samples end with "stop" as well as "length".
        model.lm_head.weight[tokenizer.eos_token_id] = model.model.norm.weight * 0.5
    model.save_pretrained(policy_dir, safe_serialization=True)
    tokenizer.save_pretrained(policy_dir)

    reward_tokenizer = make_tokenizer(REWARD_TEMPLATE)
    reward_dir = root / "reward"
    reward = LlamaForSequenceClassification(
        llama_config(len(reward_tokenizer), reward_tokenizer.pad_token_id, reward_tokenizer.eos_token_id,
                     num_labels=1)
    )
    reward.save_pretrained(reward_dir, safe_serialization=True)
    reward_tokenizer.save_pretrained(reward_dir)

    fn_file = root / "reward_fns.py"
    fn_file.write_text(
        "def length(prompts, responses):\n"
        "    return [len(r) / 10.0 for r in responses]\n"
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return TinyModels(root, policy_dir, reward_dir, f"py:{fn_file}:length", prompts)


def cli(args: list, cwd: Path | None = None):
    """`modpo-pipe ARGS` in this process (from `cwd` when given); the typer result."""
    from typer.testing import CliRunner

    from modpo_pipe.cli import app

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def ok(args: list, cwd: Path | None = None) -> str:
    result = cli(args, cwd)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def fails(args: list, fragment: str, cwd: Path | None = None, code: int = 1) -> str:
    """The command exits `code` with exactly one `error:` line (a ModpoError: no traceback) holding `fragment`;
    that line."""
    result = cli(args, cwd)
    assert result.exit_code == code, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    # (a progress bar may share the line: the message starts at "error: ")
    errors = [line[line.index("error: "):] for line in result.output.splitlines() if "error: " in line]
    assert len(errors) == 1, result.output
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    return errors[0]


def generate_and_score(work: Path, prompts: Path) -> Path:
    """pairs.parquet and scored.parquet in `work`, from a copy of `prompts` and work/modpo.toml."""
    import shutil

    shutil.copy(prompts, work / "prompts.jsonl")
    ok(["generate", "prompts.jsonl", "--out", "pairs.parquet"], work)
    ok(["score", "pairs.parquet", "--out", "scored.parquet"], work)
    return work


def settings_toml(**sections: object) -> str:
    """A modpo.toml of what each section's settings object (a modpo_pipe.config dataclass, by section name) sets
    apart from its defaults; a table such as [score].rewards as its own [score.rewards]."""
    import dataclasses

    from modpo_pipe.config import _toml_value

    lines: list[str] = []
    for name, values in sections.items():
        defaults = type(values)()
        changed = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)
                   if getattr(values, f.name) != getattr(defaults, f.name)}
        tables = {key: value for key, value in changed.items() if isinstance(value, dict)}
        if len(changed) > len(tables) or not tables:
            lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in changed.items() if key not in tables]
        for key, table in tables.items():
            lines.append(f"[{name}.{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def tiny_generate(tiny, **changes: object):
    """[generate] for short samples from the tiny policy on the transformers backend, with `changes`."""
    from modpo_pipe.config import GenerateSettings

    return GenerateSettings(policy=str(tiny.policy), backend="transformers", **changes)


def two_reward_run_settings():
    """A two-round run's settings naming models by path only (nothing loads them): what fingerprint tests hash."""
    from modpo_pipe import config as cfg

    return cfg.Settings(
        model=cfg.ModelSettings(dtype="float32", device="cpu"),
        generate=cfg.GenerateSettings(policy="/models/policy", samples_per_prompt=2, max_new_tokens=8, seed=3),
        score=cfg.ScoreSettings(rewards={"a": "/models/ra", "b": "/models/rb"}),
        train=cfg.TrainSettings(weights={"a": 0.5, "b": 0.5}, seed=3),
        run=cfg.RunSettings(rounds=2, prompts="prompts.jsonl", prompts_per_round=2),
    )


def scored_env(work: Path, tiny, reward_fns: str, max_new_tokens: int, epochs: int) -> Path:
    """`work` with reward_fns as rewards.py (its `length` the one reward), a modpo.toml of 4 responses per
    prompt and one group a training step saving every 2, and pairs.parquet and scored.parquet made from it."""
    from modpo_pipe.config import ScoreSettings, TrainSettings

    (work / "rewards.py").write_text(reward_fns)
    (work / "modpo.toml").write_text(settings_toml(
        generate=tiny_generate(tiny, max_new_tokens=max_new_tokens, samples_per_prompt=4),
        score=ScoreSettings(rewards={"length": f"py:{work / 'rewards.py'}:length"}),
        train=TrainSettings(lr=0.0005, batch_size=1, epochs=epochs, save_every=2)))
    return generate_and_score(work, tiny.prompts)


def one_round_run(run_dir: Path, tiny, reward: str, spec: str, **run: object) -> Path:
    """A run directory whose modpo.toml asks for one round of the tiny policy with one reward (and these [run]
    settings besides)."""
    from modpo_pipe.config import ModelSettings, RunSettings, ScoreSettings

    run_dir.mkdir()
    (run_dir / "modpo.toml").write_text(settings_toml(
        model=ModelSettings(device="cpu"), generate=tiny_generate(tiny, max_new_tokens=4, samples_per_prompt=2),
        score=ScoreSettings(rewards={reward: spec}), run=RunSettings(rounds=1, prompts=str(tiny.prompts), **run)))
    return run_dir


def config(env: Path) -> list:
    return ["--config", env / "modpo.toml"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.policy)


@pytest.fixture
def demo_on_tiny(monkeypatch, tiny) -> None:
    """The demo's code with the tiny policy standing in for SmolLM2 (embedded_policy_dir), and its rewards'
    packages present. The random tiny stand-in is not SmolLM2: at the demo's lr (1.5e-3, chosen on SmolLM2) its
    concision-only policy collapses to one reply per prompt by round 1, leaving no pair to train on (SmolLM2's
    --quick demo trains all rounds at that lr). The tests using this are about plumbing, so the stand-in gets
    1e-3."""
    import dataclasses

    pytest.importorskip("vaderSentiment")
    pytest.importorskip("matplotlib")
    from modpo_pipe import demo, embedded

    monkeypatch.setattr(embedded, "embedded_policy_dir", lambda *a, **k: tiny.policy)
    demo_settings = demo.demo_settings

    def stand_in_settings(*args, **kwargs):
        settings = demo_settings(*args, **kwargs)
        return dataclasses.replace(settings, train=dataclasses.replace(settings.train, lr=1e-3))

    monkeypatch.setattr(demo, "demo_settings", stand_in_settings)


# ------------------------------------------------------------------------ the fault suites (test_faults_*.py)
# Bad input, faults and resumption end to end through the commands, one file a stage: every case costs a clear
# one-line message and at most the unfinished chunk, never a half file, a silently wrong result or lost work.
# Single-module validation lives beside the modules (test_prompts.py, test_schema.py, test_rewards.py,
# test_config.py). Kills are real SIGKILLs of forked child processes (fork_cli, kill_when), at seeded points.
# What the fault suites share:

FAULTS_MAX_NEW_TOKENS = 6
FAULTS_REWARD_FNS = '''
import math

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]

def raises(prompts, responses):
    raise ValueError("model server unreachable")

def wrong_count(prompts, responses):
    return [0.0] * (len(responses) - 1)

def _france(value, positions=(0, 1, 2, 3)):
    # value for the responses at these positions of the France prompt's group of 4 (score passes a chunk's
    # responses group by group, and the tests' batches of 64 hold whole groups)
    def fn(prompts, responses):
        return [value if "France" in p and i % 4 in positions else len(r) / 10.0
                for i, (p, r) in enumerate(zip(prompts, responses))]
    return fn

nan = _france(math.nan)
inf = _france(math.inf)
none = _france(None)
one_nan = _france(math.nan, {0})
three_nan = _france(math.nan, {0, 1, 2})

def all_nan(prompts, responses):
    return [math.nan for r in responses]
'''


@pytest.fixture(scope="session")
def faults_env(tiny, tmp_path_factory) -> Path:
    """A directory with a modpo.toml, 6 prompts, and a good pairs.parquet and scored.parquet (6 groups of 4
    responses; one group a step, as one pair a step before groups: 6 steps an epoch)."""
    work = tmp_path_factory.mktemp("faults")
    return scored_env(work, tiny, FAULTS_REWARD_FNS, FAULTS_MAX_NEW_TOKENS, epochs=2)


@pytest.fixture(scope="session")
def chunked(faults_env) -> dict[str, Path]:
    """Uninterrupted generate (3 chunks of 2 prompts) and score (3 chunks of 2 groups) runs to compare with."""
    env = faults_env
    base = env / "chunked"
    base.mkdir()
    ok(["generate", env / "prompts.jsonl", *config(env), "--shard-size", 2, "--out", base / "pairs.parquet"])
    ok(["score", base / "pairs.parquet", *config(env), "--shard-size", 2, "--out", base / "scored.parquet"])
    return {"pairs": base / "pairs.parquet", "scored": base / "scored.parquet"}


# ------------------------------------------------------------ the error suites (test_*_errors.py and others)
# Misuse through the commands a user runs: every failure exits non-zero with one `error:` line naming the file,
# row, reward or setting; nothing half-done is kept. What they share besides the fault suites' set-up:

FAILURES_MAX_NEW_TOKENS = 6
FAILURES_REWARD_FNS = '''
import sys

import numpy as np

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]

def exits_0(prompts, responses):
    sys.exit(0)

def exits_bare(prompts, responses):
    sys.exit()

def exits_text(prompts, responses):
    raise SystemExit("bye")

class Stop(BaseException):
    pass

def base_exception(prompts, responses):
    raise Stop("not an Exception")

def huge(prompts, responses):
    return [1e300 if "France" in p else len(r) / 10.0 for p, r in zip(prompts, responses)]

def as_dict(prompts, responses):
    return {f"k{i}": 1.0 for i in range(len(responses))}
'''


@pytest.fixture(scope="session")
def failures_env(tiny, tmp_path_factory) -> Path:
    """A directory with a modpo.toml, reward callables (rewards.py), 6 prompts, pairs.parquet and scored.parquet
    (6 groups of 4 responses, one group a step, one epoch)."""
    work = tmp_path_factory.mktemp("failures")
    return scored_env(work, tiny, FAILURES_REWARD_FNS, FAILURES_MAX_NEW_TOKENS, epochs=1)


def modpo_pipe(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """The real entry point (`python -m modpo_pipe`, as the `modpo-pipe` script runs it), in a process of its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "modpo_pipe", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def rows_of(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def same_rows(a: Path, b: Path) -> None:
    ra, rb = rows_of(a), rows_of(b)
    assert [r["group_id"] for r in ra] == [r["group_id"] for r in rb]
    assert ra == rb


def no_leftovers(out: Path) -> None:
    """Nothing but finished files: no work directory, no temporary file beside the output."""
    from modpo_pipe import parts

    assert not parts.work_dir(out).exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_unchecked(table: pa.Table, meta: dict, path: Path) -> Path:
    """Write without the contract's checks: what a foreign, older or buggy writer could leave."""
    import pyarrow.parquet as pq

    from modpo_pipe import schema

    pq.write_table(schema.with_metadata(table, meta), path)
    return path


def interrupt(monkeypatch, module, name: str, after: int) -> dict:
    """Make module.name raise (as a kill would stop it) on call `after + 1`; count calls."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _slow_down(seconds: float) -> None:
    """In a child: make every chunk, reward call, training step and atomic rename slower, so that kills
    land mid-run (and sometimes between a temporary file's write and its rename)."""
    import modpo_pipe.generate as generate
    import modpo_pipe.rewards as rewards
    import modpo_pipe.score as score
    import modpo_pipe.train as train_module
    from modpo_pipe import storage

    def slowed(fn, delay):
        def wrapper(*args, **kwargs):
            time.sleep(delay)
            return fn(*args, **kwargs)
        return wrapper

    generate.sample = slowed(generate.sample, seconds)
    score.batched_sequence_logps = slowed(score.batched_sequence_logps, seconds)
    rewards.CallableReward._score_batch = slowed(rewards.CallableReward._score_batch, seconds)
    train_module.pair_loss = slowed(train_module.pair_loss, seconds)
    # Every durable write (Parquet files and parts' chunks) goes through storage.fsync_replace.
    storage.fsync_replace = slowed(storage.fsync_replace, seconds / 4)


def fork_cli(args: list, cwd: Path, slow: float = 0.0) -> int:
    """Run the command in a forked child (one torch thread, so every child computes bit for bit alike)."""
    import torch

    from modpo_pipe.cli import app

    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:
        torch.set_num_threads(1)
        os.chdir(cwd)
        if slow:
            _slow_down(slow)
        try:
            app([str(a) for a in args], prog_name="modpo-pipe")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_exit(pid: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def kill_when(pid: int, ready: Callable[[], bool], delay: float, timeout: float = 240) -> bool:
    """SIGKILL the child `delay` seconds after `ready()` holds; False when it exited on its own first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return False
        if ready():
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                return True
            assert os.waitstatus_to_exitcode(status) == 0
            return False
        time.sleep(0.003)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not reach the kill point")


def generate_settings(tiny, samples_per_prompt: int, **sections: object) -> str:
    """A modpo.toml for short samples from the tiny policy on the transformers backend, then `sections` (settings
    objects by section name)."""
    return settings_toml(generate=tiny_generate(tiny, max_new_tokens=6, samples_per_prompt=samples_per_prompt),
                         **sections)
