"""Reward specs: Python callables (module or file) and sequence-classification reward models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from modpo_pipe import schema
from modpo_pipe.errors import ModpoError
from modpo_pipe.rewards import (
    CallableReward,
    ModelReward,
    RewardInput,
    load_callable,
    load_reward,
    reward_inputs,
)

CPU = torch.device("cpu")
CHAT = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "How are you?"}]


def inputs(*responses: str, messages=CHAT) -> list[RewardInput]:
    return [RewardInput(list(messages), r) for r in responses]


def load(name: str, spec: str):
    return load_reward(name, spec, dtype=torch.float32, device=CPU, trust_remote_code=False)


BAD_REWARDS = '''
import math

def wrong_count(prompts, responses):
    return [0.0] * (len(responses) - 1)

def nan(prompts, responses):
    return [math.nan if r == "bad" else 1.0 for r in responses]

def inf(prompts, responses):
    return [-math.inf for r in responses]

def none_item(prompts, responses):
    return [None for r in responses]

def none_whole(prompts, responses):
    return None

def text(prompts, responses):
    return ["high" for r in responses]

def raises(prompts, responses):
    raise ValueError("model server unreachable")

def echo(prompts, responses):
    return [float(len(p) * 100 + len(r)) for p, r in zip(prompts, responses)]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def bad_rewards_file(tmp_path) -> Path:
    path = tmp_path / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    return path


# --------------------------------------------------------------------------------------- callables


def test_load_callable_from_package_module():
    from modpo_pipe import builtin_rewards

    fn, source = load_callable("modpo_pipe.builtin_rewards:concision", "reward 'c'")
    assert fn is builtin_rewards.concision
    assert source == builtin_rewards.__file__


def test_builtin_concision_through_callable_reward():
    reward = load("concise", "py:modpo_pipe.builtin_rewards:concision")
    assert isinstance(reward, CallableReward)
    scores = reward.score(inputs("short", "a much much longer reply than the other one", ""), batch_size=2)
    assert len(scores) == 3
    assert scores[0] > scores[1] > scores[2] == -1.0
    assert reward.fingerprint() == reward.fingerprint() and len(reward.fingerprint()) == 32


def test_load_callable_from_own_module_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "modpo_test_own_rewards.py").write_text(
        "def shout(prompts, responses):\n    return [float(r.count('!')) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load("loud", "py:modpo_test_own_rewards:shout")
    assert reward.score(inputs("hi", "hi!!", "!"), batch_size=8) == [0.0, 2.0, 1.0]
    assert reward.source == str(tmp_path / "modpo_test_own_rewards.py")


def test_load_callable_from_file(tiny):
    reward = load("length", tiny.reward_fn)
    assert isinstance(reward, CallableReward)
    assert reward.score(inputs("abcd", "abcdefghij"), batch_size=1) == [0.4, 1.0]
    path = Path(tiny.reward_fn[len("py:"):].rpartition(":")[0])
    import hashlib

    assert reward.fingerprint() == hashlib.sha256(path.read_bytes()).hexdigest()[:32]


def test_callable_sees_the_last_user_turn_as_prompt(bad_rewards_file):
    reward = load("echo", f"py:{bad_rewards_file}:echo")
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "second!"}]
    assert reward.score(inputs("abc", messages=messages), batch_size=4) == [len("second!") * 100 + 3]
    from_file = reward_inputs([schema.parse_messages(json.dumps(CHAT), "row 0")], ["xy"])
    assert from_file[0].prompt == "How are you?" and from_file[0].response == "xy"
    assert reward.score(from_file, batch_size=4) == [len("How are you?") * 100 + 2]


def test_file_reward_may_define_dataclasses(tmp_path):
    # A @dataclass (with `from __future__ import annotations`) looks its module up in sys.modules while
    # being defined: the file must be registered there before it runs.
    path = tmp_path / "dc_rewards.py"
    path.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Weights:\n    per_char: float = 0.5\n\n"
        "def fn(prompts, responses):\n    return [Weights().per_char * len(r) for r in responses]\n")
    reward = load("dc", f"py:{path}:fn")
    assert reward.score(inputs("abcd"), batch_size=1) == [2.0]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("no_such_module_xyz:fn", "cannot import no_such_module_xyz: ModuleNotFoundError"),
        ("modpo_pipe.builtin_rewards:nope", "modpo_pipe.builtin_rewards has no function 'nope'"),
        ("modpo_pipe.builtin_rewards", "expected py:module:function or py:file.py:function"),
        ("modpo_pipe.builtin_rewards:", "expected py:module:function"),
    ],
)
def test_load_callable_errors(target, fragment):
    with pytest.raises(ModpoError) as excinfo:
        load_callable(target, "reward 'r'")
    assert str(excinfo.value).startswith("reward 'r': ")
    assert fragment in str(excinfo.value)


def test_load_callable_file_errors(tmp_path, bad_rewards_file):
    with pytest.raises(ModpoError, match=r"reward 'r': .*missing\.py: no such file"):
        load_callable(f"{tmp_path / 'missing.py'}:fn", "reward 'r'")
    with pytest.raises(ModpoError, match="has no function 'NOT_A_FUNCTION'"):
        load_callable(f"{bad_rewards_file}:NOT_A_FUNCTION", "reward 'r'")
    broken = tmp_path / "broken.py"
    broken.write_text("def fn(:\n")
    with pytest.raises(ModpoError, match=r"reward 'r': cannot import .*broken\.py: SyntaxError"):
        load_callable(f"{broken}:fn", "reward 'r'")


@pytest.mark.parametrize(
    ("function", "fragment"),
    [
        ("wrong_count", "returned 2 scores for 3 responses"),
        ("nan", "response 1: score is nan"),
        ("inf", "response 0: score is -inf"),
        ("none_item", "response 0: score None is not a number"),
        ("none_whole", "returned NoneType, expected a list of floats"),
        ("text", "response 0: score 'high' is not a number"),
        ("raises", "raised ValueError: model server unreachable"),
    ],
)
def test_bad_callable_output_names_the_reward(bad_rewards_file, function, fragment):
    spec = f"py:{bad_rewards_file}:{function}"
    reward = load("bad_one", spec)
    with pytest.raises(ModpoError) as excinfo:
        reward.score(inputs("good", "bad", "fine"), batch_size=8)
    message = str(excinfo.value)
    assert message.startswith(f"reward 'bad_one' ({spec})")
    assert fragment in message


def test_bad_score_names_its_position_across_batches(bad_rewards_file):
    reward = load("bad_one", f"py:{bad_rewards_file}:nan")
    with pytest.raises(ModpoError, match="response 4: score is nan"):
        reward.score(inputs("a", "b", "c", "d", "bad", "e"), batch_size=2)


# ------------------------------------------------------------------------------------- reward models


@pytest.fixture(scope="module")
def reward_model(tiny) -> ModelReward:
    return load("helpful", str(tiny.reward))


def test_model_reward_renders_through_its_own_template(reward_model):
    assert isinstance(reward_model, ModelReward)
    text = reward_model.render(RewardInput([{"role": "user", "content": "Hi"}], "Hello there"))
    assert text == "Human: Hi\nBot: Hello there\n"
    assert "<|im_start|>" not in text  # the policy's template is not used
    text = reward_model.render(inputs("Fine.")[0])
    assert text == "Bot: Be nice.\nHuman: How are you?\nBot: Fine.\n"


def test_model_reward_tokenizes_the_rendered_text_without_extra_tokens(reward_model, monkeypatch):
    seen = []
    original = reward_model.tokenizer.__class__.__call__

    def spy(self, texts, **kwargs):
        seen.append((list(texts), kwargs.get("add_special_tokens")))
        return original(self, texts, **kwargs)

    monkeypatch.setattr(reward_model.tokenizer.__class__, "__call__", spy)
    reward_model.score(inputs("Fine."), batch_size=4)
    # (measured for its length first, then scored: the same text both times)
    assert seen and all(call == (["Bot: Be nice.\nHuman: How are you?\nBot: Fine.\n"], False) for call in seen)


def test_model_reward_scores_are_deterministic_one_per_input(reward_model):
    responses = ["Paris.", "I do not know, sorry about that.", "Blue light scatters more.", "Hi", "Numbers 1 2 3"]
    first = reward_model.score(inputs(*responses), batch_size=2)
    second = reward_model.score(inputs(*responses), batch_size=2)
    assert len(first) == len(responses)
    assert first == second
    assert all(isinstance(s, float) and math.isfinite(s) for s in first)
    assert len(set(first)) > 1  # a reward that ignores its input would be useless


def test_model_reward_does_not_depend_on_batching_or_padding(reward_model):
    responses = ["Hi", "A much longer answer, padded against the short one in the same batch.", "Ok then"]
    batched = reward_model.score(inputs(*responses), batch_size=3)
    alone = [reward_model.score(inputs(r), batch_size=1)[0] for r in responses]
    assert batched == pytest.approx(alone, abs=1e-4)


def test_model_reward_batches_by_length_and_answers_in_input_order(reward_model, monkeypatch):
    responses = ["A long answer that goes on and on about many things, " * 3, "Hi", "Medium answer here.", "Ok"]
    batch_lengths = []
    original = reward_model._score_batch

    def spy(batch):
        batch_lengths.append([len(x.response) for x in batch])
        return original(batch)

    monkeypatch.setattr(reward_model, "_score_batch", spy)
    scores = reward_model.score(inputs(*responses), batch_size=2)
    assert batch_lengths == [[2, 2], [19, len(responses[0])]]  # the two short ones share a batch
    alone = [reward_model.score(inputs(r), batch_size=1)[0] for r in responses]
    assert scores == pytest.approx(alone, abs=1e-4)


def test_reward_model_with_two_labels_is_refused(tmp_path):
    from conftest import REWARD_TEMPLATE, llama_config, make_tokenizer  # tests/ is on sys.path (rootdir conftest)
    from transformers import LlamaForSequenceClassification

    tokenizer = make_tokenizer(REWARD_TEMPLATE)
    model = LlamaForSequenceClassification(
        llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, num_labels=2))
    path = tmp_path / "two-labels"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with pytest.raises(ModpoError) as excinfo:
        load("classifier", str(path))
    assert f"reward 'classifier': {path} has 2 labels; a reward model needs exactly 1" == str(excinfo.value)


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "hub-id"])
def test_missing_model_gives_a_one_line_error(tmp_path, kind):
    spec = {"missing": str(tmp_path / "nope"), "empty-dir": str(tmp_path),
            "hub-id": "no-such-org-modpo-test/no-such-model"}[kind]
    with pytest.raises(ModpoError) as excinfo:
        load("helpful", spec)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("reward 'helpful': ")
    assert spec in message
    fragment = {"missing": "no such model directory", "empty-dir": "no config.json",
                "hub-id": "cannot load"}[kind]
    assert fragment in message


def test_a_callable_declares_its_bounds_as_an_attribute(tmp_path):
    """`fn.bounds = (low, high)`: what `eval` records and `front` measures hypervolume from; the builtins declare
    [-1, 1]; a reward that declares none has none, and a malformed declaration is one line naming the reward."""
    assert load("p", "py:modpo_pipe.builtin_rewards:positivity").bounds == (-1.0, 1.0)
    assert load("c", "py:modpo_pipe.builtin_rewards:concision").bounds == (-1.0, 1.0)
    source = tmp_path / "declared.py"
    source.write_text("def none(prompts, responses):\n    return [0.0] * len(responses)\n\n" + "".join(
        f"def {name}(prompts, responses):\n    return [0.0] * len(responses)\n{name}.bounds = {bounds}\n\n"
        for name, bounds in (("ints", "[0, 10]"), ("reversed", "(1, -1)"), ("three", "(0, 1, 2)"),
                             ("text", "'01'"), ("infinite", "(0, float('inf'))"), ("number", "1"))))
    assert load("n", f"py:{source}:none").bounds is None
    assert load("i", f"py:{source}:ints").bounds == (0.0, 10.0)
    for name in ("reversed", "three", "text", "infinite", "number"):
        with pytest.raises(ModpoError, match=f"reward 'x' \\(py:.*:{name}\\): its `bounds` attribute must be"):
            load("x", f"py:{source}:{name}")
