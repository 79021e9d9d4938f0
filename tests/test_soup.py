"""Rewarded soups (`modpo-pipe soup`), hypervolumes by hand, and the two fronts through eval and front."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, generate_and_score, ok
from safetensors.torch import load_file

from modpo_pipe.errors import ModpoError
from modpo_pipe.evaluate import family_hypervolumes, front_hypervolumes, hypervolume
from modpo_pipe.soup import soup

# ------------------------------------------------------------------------------------------- hypervolume


def test_hypervolume_of_one_point_is_its_box():
    assert hypervolume([(2.0, 3.0)], (0.0, 0.0)) == 6.0
    assert hypervolume([(2.0, 3.0)], (1.0, 1.0)) == 2.0


def test_hypervolume_of_two_overlapping_boxes():
    # boxes 1x3 and 3x1 overlap in a 1x1 square: 3 + 3 - 1
    assert hypervolume([(1.0, 3.0), (3.0, 1.0)], (0.0, 0.0)) == 5.0
    # a dominated point and a point below the reference on one axis add nothing
    assert hypervolume([(1.0, 3.0), (3.0, 1.0), (1.0, 1.0), (-1.0, 9.0), (9.0, -0.5)], (0.0, 0.0)) == 5.0


def test_hypervolume_of_a_staircase():
    # above (1, 1): x in [1,2] up to 4 (3), [2,3] up to 3 (2), [3,4] up to 2 (1)
    assert hypervolume([(3.0, 3.0), (2.0, 4.0), (4.0, 2.0)], (1.0, 1.0)) == 6.0
    # negative rewards, as z-less sentiment scores are: only the offsets from the reference count
    assert hypervolume([(-0.5, 0.25), (0.5, -0.25)], (-1.0, -1.0)) == pytest.approx(0.5 * 1.25 + 1.0 * 0.75)


def test_hypervolume_in_three_dimensions():
    assert hypervolume([(1.0, 1.0, 1.0)], (0.0, 0.0, 0.0)) == 1.0
    assert hypervolume([(2.0, 1.0, 1.0), (1.0, 2.0, 1.0)], (0.0, 0.0, 0.0)) == 3.0
    assert hypervolume([(2.0, 1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 1.0, 2.0)], (0.0, 0.0, 0.0)) == 4.0


def entry(label: str, family: str, per_prompt: dict[str, list[float]], reference: bool = False) -> dict:
    return {"label": label, "is_reference": reference, "family": family, "weights": None,
            "rewards": {n: {"mean": sum(v) / len(v), "sem": 0.0} for n, v in per_prompt.items()},
            "prompt_rewards": per_prompt}


def test_family_hypervolumes_and_their_bootstrap_error():
    ref = entry("reference", "reference", {"a": [0.0] * 4, "b": [0.0] * 4}, reference=True)
    steady = [entry("s1", "MODPO", {"a": [1.0] * 4, "b": [3.0] * 4}),
              entry("s2", "MODPO", {"a": [3.0] * 4, "b": [1.0] * 4})]
    noisy = [entry("n1", "rewarded soups", {"a": [0.0, 2.0, 0.0, 2.0], "b": [2.0, 2.0, 2.0, 2.0]})]
    volumes = family_hypervolumes([ref, *steady, *noisy], ["a", "b"], resamples=200)
    assert volumes["MODPO"]["hypervolume"] == 5.0 and volumes["MODPO"]["sem"] == 0.0  # no prompt varies
    assert volumes["rewarded soups"]["hypervolume"] == 2.0
    # HV = 2 * mean(a), the reference fixed at 0: the bootstrap s.e. of the mean of (0, 2, 0, 2) is the plug-in
    # std 1 over sqrt(4), 0.5, so about 2 * 0.5 = 1 (200 resamples: loosely)
    assert 0.8 < volumes["rewarded soups"]["sem"] < 1.2
    old = [{k: v for k, v in e.items() if k != "prompt_rewards"} for e in [ref, *steady]]
    assert math.isnan(family_hypervolumes(old, ["a", "b"])["MODPO"]["sem"])  # an eval.json without per-prompt data


# ------------------------------------------------------------------------------------------------- soups


def perturbed_copy(source: Path, target: Path, scale: float = 0.1, seed: int = 1) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    shutil.copytree(source, target)
    model.save_pretrained(target, safe_serialization=True)
    return target


def test_soup_interpolates_every_tensor(tiny, tmp_path):
    b = perturbed_copy(tiny.policy, tmp_path / "b")
    (b / "modpo_pipe.json").write_text(json.dumps({"weights": {"rm": 1.0, "length": 0.0}}))
    a = tmp_path / "a"
    shutil.copytree(tiny.policy, a)
    (a / "modpo_pipe.json").write_text(json.dumps({"weights": {"rm": 0.0, "length": 1.0}}))
    written = soup(a, b, [0.0, 0.25, 1.0], tmp_path / "soups")
    assert [p.name for p in written] == ["soup-0.00", "soup-0.25", "soup-1.00"]
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    w0, wq, w1 = (load_file(str(p / "model.safetensors")) for p in written)
    for name in wa:
        assert torch.equal(w0[name], wa[name]) and torch.equal(w1[name], wb[name])
        torch.testing.assert_close(wq[name], 0.75 * wa[name] + 0.25 * wb[name])
    info = json.loads((written[1] / "modpo_pipe.json").read_text())
    assert info["family"] == "rewarded soups" and info["soup"]["lambda"] == 0.25
    assert info["weights"] == {"rm": 0.25, "length": 0.75}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(written[1])
    AutoTokenizer.from_pretrained(written[1])
    assert not list((tmp_path / "soups").glob(".*"))  # no temporary directory left


def test_soup_refuses_what_cannot_be_interpolated(tiny, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModpoError, match=r"holds a LoRA adapter, not full weights; soup the merged weights"):
        soup(tiny.policy, adapter, [0.5], tmp_path / "s")

    wider = tmp_path / "wider"
    config = LlamaConfig.from_pretrained(tiny.policy)
    config.intermediate_size = 64
    LlamaForCausalLM(config).save_pretrained(wider, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny.policy).save_pretrained(wider)
    with pytest.raises(ModpoError, match=r"different architectures \(config.json intermediate_size: 128 vs 64\)"):
        soup(tiny.policy, wider, [0.5], tmp_path / "s")

    other_tok = tmp_path / "other-tokenizer"
    shutil.copytree(tiny.policy, other_tok)
    tokenizer = AutoTokenizer.from_pretrained(other_tok)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other_tok)
    with pytest.raises(ModpoError, match="use different tokenizers"):
        soup(tiny.policy, other_tok, [0.5], tmp_path / "s")
    with pytest.raises(ModpoError, match=r"in \[0, 1\]"):
        soup(tiny.policy, tiny.policy, [1.5], tmp_path / "s")
    result = cli(["soup", tiny.policy, adapter, "--out", tmp_path / "s"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "error: soup:" in result.output
    # Two lambdas with one directory name: the second used to overwrite the first, and both were reported.
    with pytest.raises(ModpoError, match=r"lambdas 0.001 and 0.004 would both write soup-0.00"):
        soup(tiny.policy, tiny.policy, [0.001, 0.004], tmp_path / "s")
    (tmp_path / "a-file").write_text("mine")  # was a FileExistsError traceback
    with pytest.raises(ModpoError, match="is a file; give a directory"):
        soup(tiny.policy, tiny.policy, [0.5], tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "mine" and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_both_fronts_through_eval_and_front(tiny, tmp_path):
    """Two single-objective MODPO policies, their soups, eval and front: each family its own line and
    hypervolume."""
    ok(["init", "--policy", tiny.policy, "--reward", f"rm={tiny.reward}", "--reward", f"length={tiny.reward_fn}"],
       tmp_path)
    toml = (tmp_path / "modpo.toml").read_text()
    for old, new in (('backend = "auto"', 'backend = "transformers"'), ("max_new_tokens = 256", "max_new_tokens = 8"),
                     ("batch_size = 8", "batch_size = 3"), ("lr = 1e-05", "lr = 0.001"),
                     ('device = "auto"', 'device = "cpu"')):
        toml = toml.replace(old, new)
    (tmp_path / "modpo.toml").write_text(toml)
    generate_and_score(tmp_path, tiny.prompts)
    for name, weights in (("rm", "rm=1,length=0"), ("length", "rm=0,length=1")):
        ok(["train", "scored.parquet", "--weights", weights, "--out", f"w-{name}"], tmp_path)
    ok(["soup", "w-rm/final", "w-length/final", "--lambdas", "0.25,0.5,0.75", "--out", "soups"], tmp_path)
    output = ok(["eval", "prompts.jsonl", "--policies", "rm=w-rm/final", "--policies", "length=w-length/final",
                 *[f"--policies=soup-{v}=soups/soup-{v}" for v in ("0.25", "0.50", "0.75")]], tmp_path)
    entries = json.loads((tmp_path / "eval.json").read_text())
    assert [e["family"] for e in entries] == ["reference", "MODPO", "MODPO"] + ["rewarded soups"] * 3
    assert all(len(e["prompt_rewards"]["rm"]) == 6 for e in entries)
    fronts = front_hypervolumes(entries, ["rm", "length"])["families"]
    for family in ("MODPO", "rewarded soups"):
        # each family's front minus the reference's first, then its area above the reference's means
        gain, beats = [line for line in output.splitlines() if line.strip().startswith(family)]
        assert gain.split()[len(family.split()):][:3] == [f"{fronts[family]['gain']:+.4g}", "±",
                                                          f"{fronts[family]['gain_sem']:.2g}"]
        assert f"{fronts[family]['beats_reference']:.4g} ± {fronts[family]['beats_reference_sem']:.2g}" in beats
    front = ok(["front", "eval.json", "--out", "front"], tmp_path)
    assert "rewarded soups" in front
    svg = (tmp_path / "front.svg").read_text()
    for family in ("MODPO", "rewarded soups"):
        assert f"{family}: {fronts[family]['gain']:+.3g} ± {fronts[family]['gain_sem']:.2g} hypervolume over" in svg


@pytest.mark.parametrize(("damage", "fragment"), [
    ("config.json", r"config.json: not valid JSON \(.*\): truncated or damaged"),
    ("modpo_pipe.json", r"modpo_pipe.json: not valid JSON \(.*\): truncated or damaged"),
    ("model.safetensors", r"model.safetensors: not a readable safetensors file"),
])
def test_soup_and_eval_name_a_damaged_file_of_a_policy(tiny, tmp_path, damage, fragment):
    """soup and eval read these files themselves: a truncated one was a JSONDecodeError or SafetensorError
    traceback (generate, score and train load through models.py, which names them)."""
    damaged = Path(shutil.copytree(tiny.policy, tmp_path / "damaged"))
    (damaged / "modpo_pipe.json").write_text(json.dumps({"weights": {"rm": 1.0}}))
    data = (damaged / damage).read_bytes()
    (damaged / damage).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModpoError, match=fragment):
        soup(damaged, tiny.policy, [0.5], tmp_path / "s")
    if damage == "modpo_pipe.json":
        from modpo_pipe.evaluate import policy_family

        with pytest.raises(ModpoError, match=fragment):
            policy_family(str(damaged))
        (damaged / "modpo_pipe.json").write_text("[]")
        with pytest.raises(ModpoError, match="expected a JSON object, got list"):
            policy_family(str(damaged))
