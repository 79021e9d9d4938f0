"""Evaluation on held-out prompts and the Pareto front.

`evaluate` samples from each policy, scores the samples with the configured rewards and estimates
KL(policy || reference) from the same samples: KL = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)], with
log pi from the sampler (raw, temperature 1) and log pi_ref from a reference forward pass.
`plot_front` draws reward against reward, one point per policy, and joins the non-dominated ones.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modpo_pipe import models, storage
from modpo_pipe.config import Settings, prompt_fields
from modpo_pipe.errors import ModpoError, out_of_memory


@dataclass
class Estimate:
    mean: float
    sem: float  # standard error of the mean

    @classmethod
    def of(cls, values: list[float]) -> Estimate:
        sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        return cls(statistics.fmean(values), sem)


@dataclass
class PolicySummary:
    label: str
    policy: str
    is_reference: bool
    weights: dict[str, float] | None  # what the policy was trained with, from its modpo_pipe.json
    samples: int
    rewards: dict[str, Estimate] = field(default_factory=dict)
    response_tokens: Estimate | None = None
    kl_to_ref: Estimate | None = None
    family: str = ""  # the front the policy belongs to: reference, MODPO, rewarded soups, other
    # What every policy of one eval was measured on: the prompts (as token ids), the sampling settings and seed,
    # and the reference's content. Summaries from several evals share a front only when theirs agree.
    setup: str = ""
    prompt_rewards: dict[str, list[float]] = field(default_factory=dict)  # per eval prompt: the mean of its samples
    # Per reward: the mean over prompts of (this policy's prompt mean - the reference's), ± its s.e.; {} for the
    # reference. See paired_differences.
    paired_to_ref: dict[str, Estimate] = field(default_factory=dict)
    # Per reward: the (low, high) its scores lie in where the reward declares them (a `py:` callable's `bounds`),
    # else None. `front` measures hypervolume from the low bounds.
    reward_bounds: dict[str, tuple[float, float] | None] = field(default_factory=dict)


def paired_differences(policy: dict[str, list[float]], reference: dict[str, list[float]]) -> dict[str, Estimate]:
    """Per reward: the mean per-prompt difference to the reference (per prompt, the policy's mean over its samples
    minus the reference's), with its standard error, stdev of the differences / sqrt(prompts). Every policy answers
    the same prompts, so what a prompt contributes whatever the policy (some invite negative replies) cancels:
    this s.e. is the one to compare a policy with the reference by, not the two means' s.e. combined."""
    return {name: Estimate.of([p - r for p, r in zip(values, reference[name], strict=True)])
            for name, values in policy.items() if values and name in reference}


def policy_info(policy: str) -> dict[str, Any]:
    """A trained policy's modpo_pipe.json (train and soup write it); {} for any other model."""
    info = Path(policy) / "modpo_pipe.json"
    return storage.read_json_object(info) if info.is_file() else {}


def trained_weights(policy: str) -> dict[str, float] | None:
    return policy_info(policy).get("weights")


def policy_family(policy: str) -> str:
    """Soups say so in their modpo_pipe.json; a policy with trained weights is MODPO's; anything else, other."""
    meta = policy_info(policy)
    return meta.get("family") or ("MODPO" if meta.get("weights") else "other")


@out_of_memory("eval", "[generate].batch_size (sampling), [score].batch_tokens (KL) or reward_batch_size")
def evaluate(settings: Settings, prompts_path: Path, policies: dict[str, str], ref: str,
             samples_per_prompt: int = 1, progress: bool = True) -> list[PolicySummary]:
    """Sample, score and estimate KL for each policy (label -> path); the reference is evaluated too."""
    from modpo_pipe import reward_http
    from modpo_pipe.generate import prepare_prompts, sample
    from modpo_pipe.logprobs import batched_sequence_logps
    from modpo_pipe.prompts import read_prompts
    from modpo_pipe.rewards import RewardInput, load_reward

    s, m, g = settings.score, settings.model, settings.generate
    if not s.rewards:
        raise ModpoError("eval needs reward specs: a [score.rewards] table or --reward NAME=SPEC")
    if samples_per_prompt < 1:
        raise ModpoError(f"--samples-per-prompt must be >= 1; got {samples_per_prompt}")
    if g.temperature != 1.0 or g.top_p != 1.0:
        print("note: KL to the reference is estimated from samples, which assumes temperature 1 and top_p 1")
    tokenizer = models.load_tokenizer(ref, m.trust_remote_code, what="reference")
    records, _ = read_prompts(prompts_path, skip_invalid=g.skip_invalid, fields=prompt_fields(g))
    prompts = prepare_prompts(records, tokenizer, settings, ref, prompts_path)
    records, prompt_ids, backend = prompts.records, prompts.ids, prompts.backend
    if prompts.dropped or prompts.truncated:  # the means cover fewer or shorter prompts than the file holds: say so
        print(f"note: {prompts.dropped} held-out prompts longer than {prompts.limit} tokens dropped, "
              f"{prompts.truncated} truncated ([generate].long_prompts)")
    all_policies = {"reference": ref, **{k: v for k, v in policies.items() if v != ref}}

    # Sample with each policy in turn (one model in memory at a time).
    samples: dict[str, list] = {}
    for label, path in all_policies.items():
        if models.tokenizer_fingerprint(models.load_tokenizer(path, m.trust_remote_code)) != \
                models.tokenizer_fingerprint(tokenizer):
            raise ModpoError(f"policy {label!r} ({path}) uses another tokenizer than the reference {ref}")
        per_prompt = sample(settings, path, tokenizer, prompt_ids, samples_per_prompt, backend, progress=progress)
        samples[label] = [(i, smp) for i, row in enumerate(per_prompt) for smp in row]
    if backend == "vllm":
        from modpo_pipe.generate.vllm import shutdown_vllm

        shutdown_vllm()  # the engine holds the last policy (and GPU memory); scoring comes next

    device = models.resolve_device(m.device)
    dtype = models.resolve_dtype(m.dtype, device)
    setup = storage.json_fingerprint({
        "prompt_ids": prompt_ids, "samples_per_prompt": samples_per_prompt, "seed": g.seed, "backend": backend,
        "temperature": g.temperature, "top_p": g.top_p, "max_new_tokens": g.max_new_tokens, "dtype": m.dtype,
        "reference": models.fingerprint(ref), "rewards": sorted(s.rewards)})
    summaries = {label: PolicySummary(label, path, label == "reference", trained_weights(path),
                                      len(samples[label]),
                                      family="reference" if label == "reference" else policy_family(path),
                                      setup=setup)
                 for label, path in all_policies.items()}
    for name, spec in s.rewards.items():
        reward = load_reward(name, spec, dtype=dtype, device=device, trust_remote_code=m.trust_remote_code,
                             http=reward_http.options(s))
        for label, rows in samples.items():
            inputs = [RewardInput(_messages(records[i]), tokenizer.decode(smp.ids, skip_special_tokens=True),
                                  records[i].messages is not None, records[i].columns, smp.ids) for i, smp in rows]
            scores = reward.score(inputs, s.reward_batch_size)
            _check_bounds(reward.bounds, scores, f"reward {name!r} ({spec})")
            summaries[label].reward_bounds[name] = reward.bounds
            summaries[label].rewards[name] = Estimate.of(scores)
            by_prompt: dict[int, list[float]] = {}
            for (i, _), score in zip(rows, scores):
                by_prompt.setdefault(i, []).append(score)
            summaries[label].prompt_rewards[name] = [statistics.fmean(by_prompt[i]) for i in sorted(by_prompt)]
        del reward
    for summary in summaries.values():
        if not summary.is_reference:
            summary.paired_to_ref = paired_differences(summary.prompt_rewards, summaries["reference"].prompt_rewards)

    ref_model = models.load_causal_lm(ref, dtype=dtype, device=device, trust_remote_code=m.trust_remote_code,
                                      what="reference")
    for label, rows in samples.items():
        ref_logps = batched_sequence_logps(ref_model, [prompt_ids[i] for i, _ in rows], [smp.ids for _, smp in rows],
                                           tokenizer.pad_token_id, s.batch_tokens)
        summaries[label].kl_to_ref = Estimate.of([smp.logp - r for (_, smp), r in zip(rows, ref_logps)])
        summaries[label].response_tokens = Estimate.of([float(len(smp.ids)) for _, smp in rows])
    return list(summaries.values())


def _check_bounds(bounds: tuple[float, float] | None, scores: list[float], where: str) -> None:
    """A score outside the declared bounds would put the front's reference point in the wrong place."""
    if bounds is not None and (outside := [x for x in scores if not bounds[0] <= x <= bounds[1]]):
        raise ModpoError(f"{where} declares bounds {bounds} but scored {outside[0]:g}: fix the scores or its "
                         "`bounds` attribute")


def _messages(record) -> list[dict[str, str]]:
    from modpo_pipe.generate import raw_messages

    return raw_messages(record)


def write_summaries(summaries: list[PolicySummary], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, json.dumps([asdict(s) for s in summaries], indent=2))


def read_summaries(paths: list[Path]) -> list[dict[str, Any]]:
    """Eval summaries from one or more files; the reference appears once."""
    out: list[dict[str, Any]] = []
    source: dict[str, Path] = {}  # label -> the file it came from
    for path in paths:
        try:
            entries = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModpoError(f"{path}: not an eval summary file: {e}") from None
        if not isinstance(entries, list) or not entries:
            raise ModpoError(f"{path}: not an eval summary file: expected a non-empty list of policy summaries "
                             f"(as `modpo-pipe eval` writes), got {_json_kind(entries)}")
        for i, entry in enumerate(entries):
            _check_summary(entry, f"{path}: summary {i}")
            first_reference = next((e for e in out if e["is_reference"]), None)
            if entry["is_reference"] and first_reference is not None:
                # Every policy is compared with the reference, prompt by prompt: files measured against other
                # prompts, samples or seeds cannot share one reference.
                if not _same_reference(first_reference, entry):
                    raise ModpoError(f"{path}: its reference differs from the one in {source['reference']} "
                                     "(other prompts, samples per prompt, seed or reference model): evaluate the "
                                     "policies in one `eval`, or with the same prompts, seed and reference")
                continue
            if entry["label"] in source:
                raise ModpoError(f"{path}: label {entry['label']!r} is also in {source[entry['label']]}; "
                                 "every policy needs its own label (`eval --policies LABEL=PATH`)")
            source[entry["label"]] = Path(path)
            out.append(entry)
    if not any(e["is_reference"] for e in out):
        raise ModpoError(f"{', '.join(map(str, paths))}: no reference entry (a summary with is_reference true, "
                         "as `modpo-pipe eval` writes): every policy is compared with the reference")
    _check_prompt_counts(out, source)
    reference = reference_entry(out)
    for entry in out:  # files written before paired differences were: from their per-prompt rewards
        if "paired_to_ref" not in entry:
            paired = {} if entry["is_reference"] else \
                paired_differences(entry.get("prompt_rewards") or {}, reference.get("prompt_rewards") or {})
            entry["paired_to_ref"] = {name: asdict(estimate) for name, estimate in paired.items()}
    return out


def reference_entry(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    return next(s for s in summaries if s["is_reference"])


def _check_prompt_counts(entries: list[dict[str, Any]], source: dict[str, Path]) -> None:
    """Per-prompt rewards of one length throughout: the bootstrap and the paired differences pair prompt i of
    every policy with prompt i of the reference, which only means something when all answered the same prompts."""
    counts = {(e["label"], name): len(values)
              for e in entries for name, values in (e.get("prompt_rewards") or {}).items()}
    if len(set(counts.values())) > 1:
        (label, name), count = next(iter(counts.items()))
        other_label, other_name = next(key for key, n in counts.items() if n != count)
        raise ModpoError(f"{source[other_label]}: {other_label!r} has per-prompt rewards ({other_name}) for "
                         f"{counts[other_label, other_name]} prompts, {label!r} ({name}, in {source[label]}) for "
                         f"{count}: summaries of other prompts cannot share a front; evaluate them in one `eval`")


def _same_reference(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two eval files measured their policies on one setup (see PolicySummary.setup); files written
    before `setup` existed: the same number of samples and of prompts."""
    if a.get("setup") and b.get("setup"):
        return a["setup"] == b["setup"]
    prompts = [len(next(iter(e.get("prompt_rewards", {}).values()), [])) for e in (a, b)]
    return a.get("samples") == b.get("samples") and prompts[0] == prompts[1]


def _check_summary(entry: Any, where: str) -> None:
    """The fields the table and the front read, with their types: a file of another shape fails in one line."""
    if not isinstance(entry, dict):
        raise ModpoError(f"{where}: expected an object, got {_json_kind(entry)}")
    for key, kind in (("label", str), ("is_reference", bool), ("rewards", dict)):
        if not isinstance(entry.get(key), kind):
            raise ModpoError(f"{where}: {key!r} is {_json_kind(entry.get(key))}, expected {kind.__name__}")
    estimates = {f"rewards.{name}": value for name, value in entry["rewards"].items()}
    estimates.update({key: entry[key] for key in ("response_tokens", "kl_to_ref") if entry.get(key) is not None})
    if not isinstance(entry.get("paired_to_ref", {}), dict):
        raise ModpoError(f"{where}: 'paired_to_ref' is {_json_kind(entry['paired_to_ref'])}, expected dict")
    estimates.update({f"paired_to_ref.{name}": value for name, value in entry.get("paired_to_ref", {}).items()})
    for key, value in estimates.items():
        if not (isinstance(value, dict) and all(_is_number(value.get(k)) for k in ("mean", "sem"))):
            raise ModpoError(f"{where}: {key} must be an object with numbers 'mean' and 'sem'")
        if key.startswith("rewards.") and not math.isfinite(value["mean"]):
            raise ModpoError(f"{where}: {key} has mean {value['mean']}: no front or table can place it")
    prompt_rewards = entry.get("prompt_rewards") or {}
    finite = [isinstance(v, list) and all(_is_number(x) and math.isfinite(x) for x in v)
              for v in (prompt_rewards.values() if isinstance(prompt_rewards, dict) else [None])]
    if not all(finite):
        raise ModpoError(f"{where}: 'prompt_rewards' must be an object of lists of finite numbers (per prompt)")
    bounds = entry.get("reward_bounds") or {}
    if not (isinstance(bounds, dict) and all(b is None or (isinstance(b, list) and len(b) == 2 and all(
            _is_number(v) and math.isfinite(v) for v in b) and b[0] < b[1]) for b in bounds.values())):
        raise ModpoError(f"{where}: 'reward_bounds' must be an object of [low, high] pairs (low < high) or nulls")
    weights = entry.get("weights")
    if weights is not None and not (isinstance(weights, dict) and all(_is_number(w) for w in weights.values())):
        raise ModpoError(f"{where}: 'weights' must be an object of numbers, or null")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "missing or null"}
    return names.get(type(value), "a number")


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Per policy: each reward's mean ± s.e., its paired difference to the reference (Δ), reply length, KL."""
    names = list(summaries[0]["rewards"])
    header = ["policy", "weights"] + names + [f"Δ {n}" for n in names] + ["tokens", "KL to ref"]
    rows = []
    for s in summaries:
        weights = "reference" if s["is_reference"] else _weights_label(s["weights"]) or s["label"]
        cells = [s["label"], weights]
        cells += [_estimate(s["rewards"][n], "+.3f") for n in names]
        paired = s.get("paired_to_ref") or {}
        cells += ["-" if s["is_reference"] else _estimate(paired[n], "+.3f") if n in paired else "n/a" for n in names]
        cells += [_estimate(s["response_tokens"], ".1f"), _estimate(s["kl_to_ref"], ".2f")]
        rows.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    prompts = len(next(iter((reference_entry(summaries).get("prompt_rewards") or {}).values()), []))
    if prompts:
        lines.append(f"Δ: paired difference to the reference, the mean over the {prompts} prompts of (the policy's "
                     "mean reward on a prompt - the reference's) ± its s.e.; every policy answered the same prompts")
    return "\n".join(lines)


def _estimate(estimate: dict[str, float], fmt: str) -> str:
    sem_fmt = fmt.lstrip("+")
    return f"{estimate['mean']:{fmt}} ± {estimate['sem']:{sem_fmt}}"


def _weights_label(weights: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in weights.items()) if weights else ""


def non_dominated(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both maximised), sorted by x."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)]
    return sorted(keep, key=lambda i: points[i][0])


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Dominated hypervolume, every objective maximised: the volume of the union of the boxes [ref, p]. A point
    not above `ref` on every axis adds nothing. Exact, by slicing along the last axis (fine for the few
    policies of a front)."""
    above = sorted((tuple(p) for p in points if all(v > r for v, r in zip(p, ref))), key=lambda p: -p[-1])
    if not above:
        return 0.0
    if len(ref) == 1:
        return above[0][0] - ref[0]
    volume = 0.0
    for i, p in enumerate(above):  # the slab between this point's last coordinate and the next one down
        lower = above[i + 1][-1] if i + 1 < len(above) else ref[-1]
        if p[-1] > lower:
            volume += (p[-1] - lower) * hypervolume([q[:-1] for q in above[: i + 1]], ref[:-1])
    return volume


def entry_family(entry: dict[str, Any]) -> str:
    if entry.get("is_reference"):
        return "reference"
    return entry.get("family") or ("MODPO" if entry.get("weights") else "other")


def reward_floors(summaries: list[dict[str, Any]], names: list[str]) -> dict[str, float | None]:
    """Per reward, the low bound every summary records for it (eval writes `reward_bounds`), or None where one
    records none or they disagree: there the nadir stands in (see front_hypervolumes)."""
    floors: dict[str, float | None] = {}
    for name in names:
        bounds = {tuple(b) if (b := (s.get("reward_bounds") or {}).get(name)) else None for s in summaries}
        floors[name] = next(iter(bounds))[0] if len(bounds) == 1 and None not in bounds else None
    return floors


def front_hypervolumes(summaries: list[dict[str, Any]], names: list[str], resamples: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
    """The fronts' hypervolumes over `names` (every reward maximised), each ± its bootstrap standard error over the
    eval prompts (the prompts resampled with replacement, one resample for every policy and the reference).

    From a point that does not depend on the reference policy: per reward its declared low bound, else the
    nadir (the worst mean of any policy, the reference included; recomputed in each resample). There, the
    reference's own hypervolume, and per family (MODPO, rewarded soups ...) its front's and the difference
    `gain`, front minus reference. Beside it `beats_reference`: the hypervolume above the reference's means,
    the area that beats the reference on every reward (0 when no policy does, however far the front reaches
    past the reference on one reward). s.e. is NaN without per-prompt rewards of one length."""
    import numpy as np

    entries = [reference_entry(summaries), *(s for s in summaries if not s["is_reference"])]
    families: dict[str, list[int]] = {}  # family -> its policies' rows in `entries`
    for i, entry in enumerate(entries[1:], start=1):
        families.setdefault(entry_family(entry), []).append(i)
    floors = list(reward_floors(summaries, names).values())

    def point_of(means: Any) -> list[float]:
        return [float(means[:, j].min()) if floor is None else floor for j, floor in enumerate(floors)]

    def volumes(means: Any) -> dict[tuple[str, str], float]:  # means: one row per entry, one column per reward
        point = point_of(means)
        out = {("reference", "hypervolume"): hypervolume([means[0]], point)}
        for family, rows in families.items():
            out[family, "hypervolume"] = hypervolume(means[rows], point)
            out[family, "gain"] = out[family, "hypervolume"] - out["reference", "hypervolume"]
            out[family, "beats_reference"] = hypervolume(means[rows], means[0])
        return out

    means = np.array([[e["rewards"][n]["mean"] for n in names] for e in entries])
    value = volumes(means)
    resampled = _resampled_means(entries, names, resamples, seed)
    sem = {key: math.nan for key in value}
    if resampled is not None:
        samples = [volumes(b) for b in resampled]
        sem = {key: float(np.std([v[key] for v in samples], ddof=1)) for key in value}
    return {
        "point": dict(zip(names, point_of(means))),
        "point_kind": {n: "nadir" if floor is None else "bound" for n, floor in zip(names, floors)},
        "reference": {"hypervolume": value["reference", "hypervolume"], "sem": sem["reference", "hypervolume"]},
        "families": {family: {**{k: value[family, k] for k in ("hypervolume", "gain", "beats_reference")},
                              **{f"{k}_sem": sem[family, k] for k in ("hypervolume", "gain", "beats_reference")},
                              "policies": [entries[i]["label"] for i in rows]}
                     for family, rows in families.items()},
    }


def _resampled_means(entries: list[dict[str, Any]], names: list[str], resamples: int, seed: int) -> Any:
    """Each entry's mean per reward in `resamples` bootstrap resamples of the prompts, the same resample for every
    entry: an array (resamples, entries, rewards); None without per-prompt rewards of one length (>= 2)."""
    import numpy as np

    per_prompt = [[(e.get("prompt_rewards") or {}).get(n) for n in names] for e in entries]
    lengths = {len(v) if v else 0 for rows in per_prompt for v in rows}
    if len(lengths) != 1 or (n_prompts := lengths.pop()) < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))
    return np.stack([np.stack([np.asarray(v)[idx].mean(axis=1) for v in rows], axis=1) for rows in per_prompt],
                    axis=1)


def family_hypervolumes(summaries: list[dict[str, Any]], names: list[str], resamples: int = 1000,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per family of policies: the hypervolume above the reference's means, the area that beats the reference on
    every reward, ± its bootstrap s.e. (front_hypervolumes has the comparison with the reference)."""
    fronts = front_hypervolumes(summaries, names, resamples, seed)["families"]
    return {family: {"hypervolume": v["beats_reference"], "sem": v["beats_reference_sem"], "policies": v["policies"]}
            for family, v in fronts.items()}


def describe_point(fronts: dict[str, Any]) -> str:
    """Where the hypervolume is measured from, and why there: '(-1, -1), the rewards' lower bounds'."""
    where = "(" + ", ".join(f"{v:+.3g}" for v in fronts["point"].values()) + ")"
    kinds = set(fronts["point_kind"].values())
    if kinds == {"bound"}:
        return f"{where}, the rewards' lower bounds"
    if kinds == {"nadir"}:
        return f"{where}, the worst mean of any policy on each reward (the nadir)"
    return where + ", " + ", ".join(f"{n}'s " + ("lower bound" if k == "bound" else "worst mean (nadir)")
                                    for n, k in fronts["point_kind"].items())


def format_hypervolumes(summaries: list[dict[str, Any]], names: list[str] | None = None) -> str:
    names = names or list(summaries[0]["rewards"])
    fronts = front_hypervolumes(summaries, names)
    prompts = len(next(iter((reference_entry(summaries).get("prompt_rewards") or {}).values()), []))
    ref = fronts["reference"]
    lines = [f"front minus reference: hypervolume over ({', '.join(names)}) from {describe_point(fronts)}; "
             f"± bootstrap s.e. over {prompts} prompts, resampled alike for every policy:"]
    for family, v in fronts["families"].items():
        lines.append(f"  {family:<16} {v['gain']:+.4g} ± {v['gain_sem']:.2g}  (front {v['hypervolume']:.4g} ± "
                     f"{v['hypervolume_sem']:.2g}, reference {ref['hypervolume']:.4g} ± {ref['sem']:.2g}; "
                     f"{len(v['policies'])} policies)")
    lines.append("area that beats the reference on every reward (hypervolume above the reference's means):")
    for family, v in fronts["families"].items():
        lines.append(f"  {family:<16} {v['beats_reference']:.4g} ± {v['beats_reference_sem']:.2g}")
    return "\n".join(lines)


def plot_front(summaries: list[dict[str, Any]], x: str, y: str, out: Path) -> list[Path]:
    """Reward x vs reward y with standard-error bars, each family of policies (MODPO, rewarded soups ...) its
    own line, the legend leading with its hypervolume minus the reference's; writes OUT.png and OUT.svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x == y:
        raise ModpoError(f"the front needs two different rewards on its axes; got {x!r} twice")
    targets = [plot_path(out, suffix) for suffix in (".png", ".svg")]
    for axis in (x, y):
        for s in summaries:
            if axis not in s["rewards"]:
                raise ModpoError(f"no reward {axis!r} in the summary of {s['label']!r}; it has {list(s['rewards'])}")
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    points = [(s["rewards"][x]["mean"], s["rewards"][y]["mean"]) for s in summaries]
    fronts = front_hypervolumes(summaries, [x, y])
    colors = dict(zip(fronts["families"], ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                           "tab:brown"]))
    for family, v in fronts["families"].items():
        line = sorted(p for s, p in zip(summaries, points) if not s["is_reference"] and entry_family(s) == family)
        ax.plot([p[0] for p in line], [p[1] for p in line], "-", color=colors.get(family, "0.5"), alpha=0.6,
                zorder=1, label=f"{family}: {v['gain']:+.3g} ± {v['gain_sem']:.2g} hypervolume over the reference "
                                f"(beats it on both: {v['beats_reference']:.3g} ± {v['beats_reference_sem']:.2g})")
    ref = fronts["reference"]
    for s, (px, py) in zip(summaries, points):
        is_ref = s["is_reference"]
        ax.errorbar(px, py, xerr=s["rewards"][x]["sem"], yerr=s["rewards"][y]["sem"],
                    fmt="*" if is_ref else "o", markersize=14 if is_ref else 8,
                    color="black" if is_ref else colors.get(entry_family(s), "0.5"), capsize=3, zorder=2,
                    label=f"reference: hypervolume {ref['hypervolume']:.3g} ± {ref['sem']:.2g}" if is_ref else None)
        soup = entry_family(s) == "rewarded soups" and s.get("weights")
        label = "reference" if is_ref else (_front_label(s["weights"], x) or s["label"]) + (" (soup)" if soup else "")
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(7, 7), fontsize=9)
    if set(fronts["point_kind"].values()) == {"nadir"}:  # within the picture (a bound usually is not): mark it
        ax.plot(*fronts["point"].values(), "x", color="0.4", markersize=8, zorder=2)
    ax.set_xlabel(f"{x} (mean reward, ± s.e.)")
    ax.set_ylabel(f"{y} (mean reward, ± s.e.)")
    ax.set_title(f"Fronts on held-out prompts\nhypervolume from {describe_point(fronts)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target)
    plt.close(fig)
    return targets


def plot_path(out: Path, suffix: str) -> Path:
    """OUT + suffix: a dot in OUT's name is kept (`front-beta0.1` -> `front-beta0.1.png`), a .png or .svg
    given with it is not doubled."""
    if not out.name:
        raise ModpoError(f"--out {str(out)!r}: needs a file name (the plot is written as NAME.png and NAME.svg)")
    stem = out.name[: -len(out.suffix)] if out.suffix.lower() in (".png", ".svg") else out.name
    return out.with_name(stem + suffix)


def _front_label(weights: dict[str, float] | None, x: str) -> str:
    if not weights:
        return ""
    return f"w_{x}={weights.get(x, 0.0):.2f}"


def weight_grid(names: list[str], points: int) -> list[dict[str, float]]:
    """Weight vectors across the simplex: for two rewards, `points` evenly spaced; for more, each vertex
    and the centre."""
    if len(names) == 2:
        if points < 2:
            raise ModpoError(f"--grid must be >= 2 (the two ends of the front); got {points}")
        return [{names[0]: i / (points - 1), names[1]: 1 - i / (points - 1)} for i in range(points)]
    vertices = [{n: float(n == name) for n in names} for name in names]
    return [*vertices, {n: 1 / len(names) for n in names}]
