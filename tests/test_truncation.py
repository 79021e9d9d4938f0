"""What reward models and the policy read when texts are padded or too long: reward pooling independent of the
batch and of pad ids, long reward inputs cut from the start of the prompt (counted, or refused when the
response alone does not fit), long prompts cut in their text before rendering so every model reads the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REWARD_TEMPLATE, cli, config, llama_config, make_tokenizer, ok, settings_toml, tiny_generate

from modpo_pipe.config import ModelSettings, ScoreSettings
from modpo_pipe.errors import ModpoError
from modpo_pipe.rewards import ModelReward, RewardInput

TEXTS = ["Why is the sky blue?", "Tell me a story about a brave little robot who learns to paint. " * 3, "Hi"]
RESPONSES = ["Paris.", "The quick brown fox jumps over the lazy dog. " * 2, "I love sunny days."]


def eos_padded_reward(root: Path, padding_side: str, config_pad: str, max_positions: int = 512) -> Path:
    """A reward model whose tokenizer has no pad token (modpo-pipe pads with EOS) and whose chat template ends
    every conversation with EOS; config.pad_token_id is unset (then set to EOS) or another token's id."""
    tokenizer = make_tokenizer(REWARD_TEMPLATE + "<|im_end|>")
    other_pad = tokenizer.convert_tokens_to_ids("<|pad|>")
    tokenizer.pad_token = None
    tokenizer.padding_side = padding_side
    torch.manual_seed(1)
    from transformers import LlamaForSequenceClassification

    cfg = llama_config(len(tokenizer), None, tokenizer.eos_token_id, num_labels=1)
    cfg.max_position_embeddings = max_positions
    cfg.pad_token_id = other_pad if config_pad == "other" else None
    path = root / f"rm-{padding_side}-{config_pad}-{max_positions}"
    LlamaForSequenceClassification(cfg).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def reward(path: Path, **kw) -> ModelReward:
    return ModelReward("rm", str(path), dtype=torch.float32, device=torch.device("cpu"), trust_remote_code=False,
                       **kw)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("config_pad", ["eos", "other"])
def test_reward_is_read_at_the_last_token_alone_or_batched(tmp_path, padding_side, config_pad):
    rm = reward(eos_padded_reward(tmp_path, padding_side, config_pad))
    assert rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id
    inputs = [RewardInput([{"role": "user", "content": t}], r) for t, r in zip(TEXTS, RESPONSES)]
    batched = rm.score(inputs, batch_size=3)
    for x, together in zip(inputs, batched):
        alone = rm.score([x], batch_size=1)[0]
        # What the model says at the conversation's last token (the EOS the template ends with), unpadded.
        ids = torch.tensor([rm.tokenizer(rm.render(x), add_special_tokens=False)["input_ids"]])
        assert ids[0, -1] == rm.tokenizer.eos_token_id
        with torch.no_grad():
            truth = rm.model.score(rm.model.model(input_ids=ids).last_hidden_state)[0, -1, 0].item()
        assert abs(alone - truth) <= 1e-5 and abs(together - alone) <= 1e-5, (alone, together, truth)


def test_fit_messages_cuts_the_earliest_content_first(tiny_tokenizer):
    from modpo_pipe.prompts import fit_messages

    messages = [{"role": "system", "content": "You are kind. " * 10},
                {"role": "user", "content": "Tell me a story about a robot."}]

    def length(m):
        return len(tiny_tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])

    full = length(messages)
    fitted = fit_messages(messages, length, full - 5, tiny_tokenizer)
    assert length(fitted) <= full - 5 and [m["role"] for m in fitted] == ["system", "user"]
    assert fitted[1] == messages[1] and messages[0]["content"].endswith(fitted[0]["content"])
    fitted = fit_messages(messages, length, length([messages[0] | {"content": ""}, messages[1]]) - 2,
                          tiny_tokenizer)
    assert fitted[0]["content"] == "" and messages[1]["content"].endswith(fitted[1]["content"])
    assert fit_messages(messages, length, 3, tiny_tokenizer) is None  # the template alone is longer


def test_reward_input_too_long_loses_the_start_of_its_prompt_and_a_long_response_is_refused(tmp_path):
    rm = reward(eos_padded_reward(tmp_path, "right", "eos", max_positions=40))
    long_prompt = "Tell me a story about a brave little robot who learns to paint. " * 4
    x = RewardInput([{"role": "user", "content": long_prompt}], "Paris is the capital of France.")
    short = RewardInput([{"role": "user", "content": "Why?"}], "Paris.")
    scores = rm.score([x, short], batch_size=2)
    assert rm.truncated == [True, False]
    fitted = rm.fit(x, "x")
    text = rm.render(fitted)
    assert len(rm.encode([text])["input_ids"][0]) <= 40
    assert text.endswith("Bot: Paris is the capital of France.\n<|im_end|>")  # the response whole, EOS last
    assert long_prompt.endswith(fitted.messages[0]["content"]) and fitted.messages[0]["content"]
    assert scores[0] == pytest.approx(rm.score([fitted], 1)[0], abs=1e-5)
    with pytest.raises(ModpoError, match="pair 'p/0' response 1: the response alone is longer than the reward "
                                         "model's 40 tokens"):
        rm.score([RewardInput([{"role": "user", "content": "Hi"}], "The quick brown fox. " * 20)], 1,
                 labels=["pair 'p/0' response 1"])


@pytest.fixture(scope="module")
def long_env(tiny, tmp_path_factory) -> Path:
    """Prompts longer than max_prompt_tokens (truncate), pairs from them, scored by a 48-position reward model."""
    work = tmp_path_factory.mktemp("long")
    rm = eos_padded_reward(work, "right", "eos", max_positions=48)
    (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "messages": [{"role": "system", "content": "Please write a kind note to a friend. " * 3},
                                 {"role": "user", "content": "What is the capital of France?"}]},
        {"id": "b", "prompt": "Explain why the sky is blue in one sentence. " * 4},
        {"id": "c", "prompt": "Count from one to five."},
    ]))
    (work / "modpo.toml").write_text(settings_toml(
        model=ModelSettings(device="cpu", dtype="float32"),
        generate=tiny_generate(tiny, max_new_tokens=8, samples_per_prompt=4, max_prompt_tokens=48,
                               long_prompts="truncate"),
        score=ScoreSettings(rewards={"rm": str(rm)})))
    ok(["generate", "prompts.jsonl", "--out", "pairs.parquet"], work)
    return work


def test_long_prompts_are_cut_in_their_text_so_every_model_reads_the_same(long_env, tiny_tokenizer):
    table = pq.read_table(long_env / "pairs.parquet").to_pylist()
    meta = json.loads(pq.read_schema(long_env / "pairs.parquet").metadata[b"modpo_pipe"])
    assert meta["counts"]["long_prompts_truncated"] == 2
    start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    for row in table:
        messages = json.loads(row["prompt_messages"])
        rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # What the reward models read (prompt_messages) renders to exactly the ids the policy sampled from.
        assert tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"] == row["prompt_ids"]
        assert len(row["prompt_ids"]) <= 48 and row["prompt_ids"][0] == start  # the template's header stays
    a = json.loads(next(r for r in table if r["prompt_id"] == "a")["prompt_messages"])
    assert a[1]["content"] == "What is the capital of France?"  # the cut came from the start (the system text)


def test_score_counts_reward_inputs_cut_to_fit(long_env):
    result = cli(["score", long_env / "pairs.parquet", *config(long_env), "--out", long_env / "scored.parquet"])
    assert result.exit_code == 0, result.output
    meta = json.loads(pq.read_schema(long_env / "scored.parquet").metadata[b"modpo_pipe"])
    truncated = meta["score_counts"]["truncated_by_reward"]["rm"]
    assert 0 < truncated <= 12 and f"rm: {truncated}" in result.output
    shutil.rmtree(long_env / "scored.parquet.parts", ignore_errors=True)


@pytest.mark.parametrize("turns", [3, 40, 500])
def test_fit_messages_measures_a_long_chat_a_logarithmic_number_of_times(tiny_tokenizer, turns):
    """A 2000-turn chat with long_prompts = "truncate" took 111 s for one prompt: every emptied message cost a
    render of the whole conversation, and one that could never fit was dropped only after all of them. The
    shortened conversation is the same as before."""
    from modpo_pipe.prompts import cut_earliest, fit_messages

    messages = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} is about robots. " * 3}
                for i in range(turns)] + [{"role": "user", "content": "And the question?"}]
    tokens = {m["content"]: len(tiny_tokenizer(m["content"])["input_ids"]) for m in messages}
    calls = []

    def length(m):  # a template that adds 3 tokens a message
        calls.append(1)
        return sum(3 + (tokens.get(x["content"]) or len(tiny_tokenizer(x["content"])["input_ids"])) for x in m)

    for keep in (1, 2, turns // 2):
        limit = length([{**m, "content": ""} for m in messages[:-keep]] + messages[-keep:]) + 4
        calls.clear()
        fitted = fit_messages(messages, length, limit, tiny_tokenizer)
        assert len(calls) <= 2 * turns.bit_length() + 8, len(calls)
        if turns <= 40:  # the old way, one render per emptied message, is slow at 500
            # the old way: cut the earliest content, one render per cut, from the first message on
            assert fitted == cut_earliest([dict(m) for m in messages], length, limit, tiny_tokenizer)
        assert length(fitted) <= limit and fitted[-keep:] == messages[-keep:]
    calls.clear()
    assert fit_messages(messages, length, 3 * len(messages) - 1, tiny_tokenizer) is None  # headers alone too long
    assert len(calls) <= 2
