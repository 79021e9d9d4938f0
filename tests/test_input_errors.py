"""Inputs: prompts and stage files that cannot be used are refused (or skipped) in one line naming the file, row
or group, before any work where that can be known.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAILURES_MAX_NEW_TOKENS,
    config,
    fails,
    ok,
    write_unchecked,
)

from modpo_pipe import parts, schema


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


# --------------------------------------------------------------------------------------------------- prompts


def _surrogate_prompts(path: Path, row: bytes) -> Path:
    path.write_bytes(b'{"id": "a", "prompt": "Why is the sky blue?"}\n' + row + b"\n"
                     + b'{"id": "b", "prompt": "Count from one to five."}\n')
    return path


@pytest.mark.parametrize("row", [
    rb'{"id": "x", "prompt": "\ud800"}',
    rb'{"id": "x", "prompt": "tail \udfff"}',
    rb'{"id": "x", "messages": [{"role": "user", "content": "\ud83d"}]}',
    rb'{"id": "\ud800", "prompt": "fine"}',
], ids=["lone-high", "lone-low", "in-messages", "in-id"])
def test_a_lone_surrogate_is_not_valid_unicode_and_skippable(env, tmp_path, row):
    prompts, out = _surrogate_prompts(tmp_path / "prompts.jsonl", row), tmp_path / "pairs.parquet"
    args = ["generate", prompts, *config(env), "--out", out, "--samples-per-prompt", 2]
    fails(args, f"{prompts}:2: not valid Unicode")
    assert not out.exists()
    ok([*args, "--skip-invalid"])
    table, meta = schema.read_table(out, "pairs")
    assert meta["counts"]["skipped_invalid"] == 1
    assert table.column("prompt_id").to_pylist() == ["a", "b"]


def test_a_huge_prompt_is_dropped_without_tokenising_it_whole(env, tmp_path, monkeypatch):
    from modpo_pipe import models

    seen: list[int] = []
    real_load = models.load_tokenizer

    def spying_load(*args, **kwargs):
        tokenizer = real_load(*args, **kwargs)
        real_call = type(tokenizer).__call__

        def spy(self, text, *a, **k):
            seen.append(max(len(t) for t in text) if isinstance(text, list) else len(text))
            return real_call(self, text, *a, **k)

        monkeypatch.setattr(type(tokenizer), "__call__", spy)
        return tokenizer

    monkeypatch.setattr(models, "load_tokenizer", spying_load)
    huge = "Tell me a story about a brave little robot. " * 50_000  # 2.2 MB on one line
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.parquet"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Why is the sky blue?"}) + "\n"
                       + json.dumps({"id": "huge", "prompt": huge}) + "\n")
    args = ["generate", prompts, *config(env), "--out", out, "--samples-per-prompt", 2]
    ok(args)
    assert schema.read_table(out, "pairs")[1]["counts"]["long_prompts_dropped"] == 1
    limit = 512 - FAILURES_MAX_NEW_TOKENS  # the tiny policy's context leaves this for a prompt
    assert max(seen) < 100 * limit < len(huge), max(seen)  # a bounded slice, never the whole line
    seen.clear()
    ok([*args, "--long-prompts", "truncate", "--out", tmp_path / "t.parquet"])
    table = schema.read_table(tmp_path / "t.parquet", "pairs")[0]
    kept = {r["prompt_id"]: r["prompt_ids"] for r in table.to_pylist()}
    assert len(kept["huge"]) == limit and max(seen) < 100 * limit


def test_bounding_keeps_the_tokens_of_the_end(tiny_tokenizer):
    """Cut to its end before tokenising, a long prompt truncates to the same last tokens as tokenised whole."""
    from modpo_pipe.prompts import PromptRecord, max_token_chars, render

    text = " ".join(f"word{i} and more words" for i in range(3000))
    record = PromptRecord("p", prompt=text)
    whole = tiny_tokenizer(text)["input_ids"]
    _, bounded = render(record, tiny_tokenizer, use_chat_template=False, max_tokens=100)
    assert len(bounded) > 100 and len(bounded) < len(whole)
    assert bounded[-100:] == whole[-100:]
    assert 2 * 100 * max_token_chars(tiny_tokenizer) < len(text)
    short = PromptRecord("s", prompt="Why is the sky blue?")
    assert render(short, tiny_tokenizer, False, max_tokens=100) == render(short, tiny_tokenizer, False)


STRICT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_the_chat_template_refuses_is_a_bad_row(env, tiny, tmp_path):
    """Real templates (Llama 2, Mistral, Gemma) refuse roles that do not alternate: a jinja2 TemplateError
    traceback that named no prompt, in generate (even with --skip-invalid) and in score."""
    strict = Path(shutil.copytree(tiny.policy, tmp_path / "strict"))
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "two-users", "messages": [{"role": "user", "content": "q"},
                                                                   {"role": "user", "content": "q2"}]}) + "\n"
                       + json.dumps({"id": "fine", "prompt": "Hello?"}) + "\n")
    generate = ["generate", prompts, *config(env), "--policy", strict, "--out", tmp_path / "pairs.parquet"]
    fails(generate, "prompt 'two-users': the policy's chat template refuses it: Conversation roles must alternate")
    output = ok([*generate, "--skip-invalid"])
    assert [r["prompt_id"] for r in pq.read_table(tmp_path / "pairs.parquet").to_pylist()] == ["fine"]
    assert schema.read_metadata(tmp_path / "pairs.parquet")["counts"]["skipped_invalid"] == 1, output
    # the reward model's template, on a conversation the policy's template took
    ok(["generate", prompts, *config(env), "--out", tmp_path / "loose.parquet"])
    reward = Path(shutil.copytree(tiny.reward, tmp_path / "strict-reward"))
    (reward / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    fails(["score", tmp_path / "loose.parquet", *config(env), "--reward", f"rm={reward}",
           "--out", tmp_path / "scored.parquet"],
          "the reward model's chat template refuses this conversation: Conversation roles must alternate")


def test_a_prompts_path_that_is_a_symlink_loop_is_one_line(faults_env, tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    fails(["generate", loop, *config(faults_env), "--out", tmp_path / "pairs.parquet"],
          f"{loop}: a symbolic link that leads nowhere")
    fails(["score", loop, *config(faults_env), "--out", tmp_path / "scored.parquet"], f"{loop}")


def test_two_files_of_prompts_without_ids_say_why_their_groups_collide(env, tmp_path):
    """Both files number their prompts row-000000, ...: train said only 'the scored files share group_ids'."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{name} {i}?"}) + "\n"
                                                        for i in range(2)))
        ok(["generate", tmp_path / f"{name}.jsonl", *config(env), "--out", tmp_path / f"{name}-pairs.parquet"])
        ok(["score", tmp_path / f"{name}-pairs.parquet", *config(env), "--out", tmp_path / f"{name}.parquet"])
    fails(["train", tmp_path / "a.parquet", tmp_path / "b.parquet", *config(env), "--out", tmp_path / "x"],
          f"{tmp_path / 'b.parquet'}: group 'r0/row-000000' is in {tmp_path / 'a.parquet'} too: the same groups "
          "given twice (or prompts without ids in both, numbered row-NNNNNN in each: give them ids)")


# ------------------------------------------------------------------- prompt + response beyond the context


@pytest.fixture(scope="module")
def short_context(tiny, tmp_path_factory) -> Path:
    """The tiny policy with a context window of 8 tokens: shorter than any prompt + response of the fault files."""
    import shutil

    path = tmp_path_factory.mktemp("short") / "policy"
    shutil.copytree(tiny.policy, path)
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 8}))
    return path


def test_score_refuses_responses_beyond_the_references_context_before_any_work(faults_env, short_context, tmp_path):
    """score computed reference log-probs past the context window without a word."""
    out = tmp_path / "scored.parquet"
    line = fails(["score", faults_env / "pairs.parquet", *config(faults_env), "--ref", short_context, "--out", out],
                 f"{faults_env / 'pairs.parquet'}: group 'r0/p0' response 1: prompt + response are ")
    assert f"beyond the 8 of the reference {short_context}'s context window" in line
    assert not out.exists() and not Path(f"{out}.parts").exists()  # refused before any reward ran


def test_train_refuses_responses_beyond_the_policys_context_before_any_work(faults_env, short_context, tmp_path):
    """train warned of a huge log-prob gap, trained on it and exited 0."""
    out = tmp_path / "ckpt"
    line = fails(["train", faults_env / "scored.parquet", *config(faults_env), "--policy", short_context,
                  "--out", out], f"{faults_env / 'scored.parquet'}: group 'r0/p0' response 1: prompt + response are ")
    assert f"beyond the 8 of the policy {short_context}'s context window" in line
    assert not out.exists()


# ---------------------------------------------------------------------------- pairs and scored files


def test_no_reference_part_with_a_non_finite_log_prob_is_kept(env, tmp_path, monkeypatch):
    import modpo_pipe.score as score

    real = score.batched_sequence_logps

    def infinite(*args, **kwargs):
        logps = real(*args, **kwargs)
        return [float("-inf")] + logps[1:]

    monkeypatch.setattr(score, "batched_sequence_logps", infinite)
    out = tmp_path / "scored.parquet"
    fails(["score", env / "pairs.parquet", *config(env), "--out", out, "--shard-size", 4],
          "group 'r0/p0' response 1: ref_logps is -inf as stored (float32)")
    assert not list(parts.work_dir(out).glob("ref-*.parquet"))  # the finished reward parts stay, no ref part


@pytest.mark.slow
def test_train_refuses_files_scored_by_other_reward_models_or_another_reference(env, tiny, tmp_path):
    """train compared the files' reward names only: one name could stand for two reward models, and two files
    scored against two references trained as one target, silently (the run itself never mixes them)."""
    prompts = tmp_path / "more.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    ok(["generate", prompts, *config(env), "--out", tmp_path / "pairs.parquet"])
    other_fn = tmp_path / "other.py"
    other_fn.write_text("def length(prompts, responses):\n    return [len(r) / 5.0 for r in responses]\n")
    ok(["score", tmp_path / "pairs.parquet", *config(env), "--reward", f"length=py:{other_fn}:length",
        "--out", tmp_path / "swapped.parquet"])
    train = ["train", env / "scored.parquet", *config(env), "--out", tmp_path / "x"]
    fails([*train[:2], tmp_path / "swapped.parquet", *train[2:]],
          f"reward 'length' was scored with 'py:{other_fn}:length', in {env / 'scored.parquet'} with")
    other_ref = Path(shutil.copytree(tiny.policy, tmp_path / "other-ref"))
    config_json = json.loads((other_ref / "config.json").read_text())
    (other_ref / "config.json").write_text(json.dumps({**config_json, "note": "another copy"}))
    ok(["score", tmp_path / "pairs.parquet", *config(env), "--ref", other_ref, "--out", tmp_path / "ref.parquet"])
    fails([*train[:2], tmp_path / "ref.parquet", *train[2:]], f"scored against the reference '{other_ref}'")
    ok(["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "same.parquet"])
    ok([*train[:2], tmp_path / "same.parquet", *train[2:]])  # same reward models, same reference: one target
    # the file whose statistics z-score the rewards: the same reward models, whatever its reference
    fails([*train, "--reward-stats", tmp_path / "swapped.parquet"], "one name, two reward models")
    ok([*train[:-1], tmp_path / "y", "--reward-stats", tmp_path / "ref.parquet"])


def test_score_refuses_a_sampling_policy_changed_since_as_its_reference(env, tiny, tmp_path):
    """With no --ref, score loads the policy the pairs file names; a directory overwritten since (a checkpoint
    saved in place) became the reference silently, another model than the one that sampled."""
    policy = Path(shutil.copytree(tiny.policy, tmp_path / "policy"))
    ok(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "pairs.parquet"])
    config_json = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config_json, "note": "saved again"}))
    score = ["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "scored.parquet"]
    fails(score, f"the policy that sampled it, {policy}, has changed since (other contents); give the reference "
                 "explicitly")
    ok([*score, "--ref", policy])  # what is there now, asked for by name


def test_a_sampling_policy_gone_is_not_blamed_on_score_ref(env, tiny, tmp_path):
    """With no --ref, the reference is the policy the pairs file names; when that directory was gone the error
    named [score].ref, a setting the user never gave."""
    policy = Path(shutil.copytree(tiny.policy, tmp_path / "policy"))
    ok(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "pairs.parquet"])
    shutil.rmtree(policy)
    output = fails(["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "s.parquet"],
                   f"the policy that sampled {tmp_path / 'pairs.parquet'} (its default reference)")
    assert "[score].ref" not in output


def test_score_names_the_metadata_a_pairs_file_lacks(env, tmp_path):
    """A pairs file built outside the pipeline with the schema's columns but not all of its metadata passed
    validation, then score ended in KeyError: 'policy' (or 'tokenizer_fingerprint' with --ref)."""
    table, meta = schema.read_table(env / "pairs.parquet", "pairs")
    path = write_unchecked(table, {"schema_version": meta["schema_version"], "stage": "pairs"},
                           tmp_path / "pairs.parquet")
    fails(["score", path, *config(env), "--out", tmp_path / "s.parquet"], "metadata has no 'policy'")


@pytest.mark.parametrize(("value", "group"), [("not json", 0), ('{"role": "user"}', 1), ("[]", 2),
                                              ('[{"role": "user", "content": 3}]', 3)])
def test_a_pairs_file_whose_prompt_messages_are_not_a_chat_is_one_line(env, tmp_path, value, group):
    """prompt_messages, what the reward models read, was parsed inside scoring: a JSONDecodeError, TypeError or
    KeyError traceback, or an IndexError blamed on the user's reward function."""
    table, meta = schema.read_table(env / "pairs.parquet", "pairs")
    column = table.column("prompt_messages").to_pylist()
    column[group] = value
    table = table.set_column(table.schema.get_field_index("prompt_messages"), "prompt_messages", pa.array(column))
    path = write_unchecked(table, meta, tmp_path / "pairs.parquet")
    gid = table.column("group_id")[group].as_py()
    fails(["score", path, *config(env), "--out", tmp_path / "s.parquet"],
          f"{path}: group {gid!r}: prompt_messages must be a JSON list of {{role, content}} strings")
