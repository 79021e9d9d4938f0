"""Settings: one TOML file (`modpo.toml`), every key overridable by a command-line flag.

The dataclasses below are the single source of truth: `modpo-pipe init` writes its commented template
from them and the CLI derives one flag per field from them, so a key can never exist in one place and
not the other.

Paths in the TOML are relative to the TOML's directory; paths given as flags are relative to the
current directory. Model paths that do not exist locally are left alone (they may be hub ids).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modpo_pipe.errors import ModpoError
from modpo_pipe.prompts import PromptFields, is_hub_id
from modpo_pipe.reward_http import is_served, parse_spec
from modpo_pipe.roles import Role, described, problem, role
from modpo_pipe.tracking import CHOICES as TRACKER_CHOICES
from modpo_pipe.values import coerce, toml_value

_toml_value = toml_value  # the name the tests import

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_NAME = "modpo.toml"
POSITIVE, NON_NEGATIVE = (("> 0", ""),), ((">= 0", ""),)
GLOBAL_BATCH = "batch_size x grad_accum x processes stays"
# A group's responses are sampled side by side (batch_size prompts x N replies a batch), scored and trained together
# (a group is train's smallest micro-batch, all N(N-1)/2 of its pairs by default): a typo of 10^9 planned that many
# replies before the first was sampled. 1024 is 523,776 pairs a prompt.
MAX_SAMPLES_PER_PROMPT = 1024


def setting(default: Any, help: str, *, path: str | None = None, flag: str | None = None, **declared: Any) -> Any:
    """A config field. `path` is "model" (a local dir or a hub id), "output", or "prompts" (a local path, else a
    Hub dataset id); `flag` renames the CLI flag; `declared` is what the setting means to the pipeline (roles.Role:
    allowed values, whether it changes results, may change on resume, is set by `run`)."""
    meta = {"help": help, "path": path, "flag": flag, "role": Role(**declared)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSettings:
    dtype: str = setting("auto", "Compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, "
                                       "float16. train keeps float32 master weights and refuses float16.",
                        choices=("auto", "float32", "bfloat16", "float16"))
    device: str = setting("auto", "Device for generate/score/train: auto (cuda if available), cpu, cuda, cuda:1 ...",
                          result="none")
    trust_remote_code: bool = setting(
        False, "Run modelling code shipped inside model repositories. Off: only built-in architectures load.",
        result="none")
    attention: str = setting(
        "auto", "Attention kernel of score and train: auto (SDPA, until flex attention has been measured on a GPU), "
        "flex (CUDA only: block masks skip what the packed rows' mask hides), sdpa or eager.",
        choices=("auto", "flex", "sdpa", "eager"), result="none", in_legacy_key=False)


@dataclass
class GenerateSettings:
    policy: str = setting("", "Policy that samples the pairs: a local directory or a hub id.", path="model",
                          result="content")
    backend: str = setting("auto", "Sampler: auto (vllm when it imports and a GPU is present), transformers, vllm.",
                           choices=("auto", "transformers", "vllm"))
    samples_per_prompt: int = setting(
        2, "N, 2 to 1024: responses sampled per prompt, stored together as one group; train forms pairs within a "
        "group ([train].pairs). Replaces pairs_per_prompt = P, which is read as N = 2P.", eval_flag=False,
        bounds=((">= 2", "a pair needs two responses"), (f"<= {MAX_SAMPLES_PER_PROMPT}", "a group's responses are "
                "sampled side by side and trained in one forward pass")))
    temperature: float = setting(1.0, "Sampling temperature (> 0).", bounds=POSITIVE)
    top_p: float = setting(1.0, "Nucleus sampling mass in (0, 1].", bounds=(("(0, 1]", ""),))
    max_new_tokens: int = setting(256, "Maximum tokens per response; longer ones end with finish_reason 'length'.",
                                  bounds=POSITIVE)
    max_prompt_tokens: int = setting(1024, "Longest rendered prompt in tokens; see long_prompts.", bounds=POSITIVE)
    long_prompts: str = setting("drop", "What to do with longer prompts: drop or truncate (cut from the start of "
                                        "the text), both counted.", choices=("drop", "truncate"))
    skip_invalid: bool = setting(False, "Skip (and count) malformed prompt rows instead of stopping at the first.")
    split: str = setting("", "With a dataset (Hub id or folder of data files): the split to read (empty: its only).",
                         result="content")
    prompt_field: str = setting("prompt", "The column or JSON field holding a plain prompt.", result="content")
    messages_field: str = setting(
        "messages", "The column or JSON field holding a chat ({role, content} list); trailing assistant turns "
        "(a dataset's reference reply) are dropped.", result="content")
    id_field: str = setting("id", "The column or JSON field holding a prompt's id (absent: row-NNNNNN).",
                            result="content")
    chat_template: bool = setting(True, "Render plain prompts with the tokenizer's chat template when it has one.")
    seed: int = setting(0, "Sampling seed; each chunk derives its own seed from it, so reruns are reproducible.")
    # Compared for a finished stage; a killed one resumes under any batch size: its finished chunks stand as sampled.
    batch_size: int = setting(16, "Prompts per generation batch (transformers backend).", bounds=POSITIVE,
                              resume_free=True)
    chunk_size: int = setting(
        256, "Prompts per resumable chunk (also read as shard_size): finished chunks wait in OUT.parts/ until all "
        "are done, so a killed run loses at most one chunk. Each chunk's seed derives from its index: a resumed run "
        "writes the same rows.", bounds=POSITIVE, work=True, eval_flag=False, recorded_as="shard_size")
    out: str = setting("pairs.parquet", "Output file.", path="output", result="none", run_sets=True, eval_flag=False)
    # The engine's length decides which prompts fit (the prompt token limit the work directory records).
    vllm_max_model_len: int = setting(0, "vLLM max_model_len (0: prompt + response limit).", result="none",
                                      bounds=NON_NEGATIVE, work=True)
    vllm_gpu_memory_utilization: float = setting(0.9, "vLLM gpu_memory_utilization.", result="none",
                                                 bounds=(("(0, 1]", ""),))
    vllm_tensor_parallel_size: int = setting(1, "vLLM tensor_parallel_size (GPUs per engine).", result="none",
                                             bounds=POSITIVE)
    vllm_enforce_eager: bool = setting(False, "vLLM enforce_eager (no CUDA graphs).", result="none")


@dataclass
class ScoreSettings:
    rewards: dict[str, str] = setting(
        {},
        "Named reward models: NAME = a sequence-classification model (dir or hub id), "
        "py:package.module:function / py:path/to/file.py:function (modpo-pipe's (prompts, responses) or a TRL reward "
        "function), or a served model: http://HOST:PORT/PATH#revision=R (modpo-pipe's JSON) or "
        "vllm+http://HOST:PORT/classify#revision=R (vllm serve). A py: callable is code you chose to run: "
        "modpo-pipe imports and calls it like any script of yours.",
        flag="reward", result="content",
    )
    ref: str = setting("", "Reference model for ref_logps; empty: the policy that generated the pairs.", path="model",
                       result="content")
    batch_tokens: int = setting(8192, "Token budget of one reference forward batch (sequences sorted by length).",
                                result="none", bounds=POSITIVE)
    reward_batch_size: int = setting(16, "Texts per reward-model batch.", result="none", bounds=POSITIVE)
    chunk_size: int = setting(
        1024, "Pairs per resumable chunk (also read as shard_size): finished chunks (per reward and for the "
        "reference) wait in OUT.parts/ until all are done, so a killed run recomputes at most one chunk.",
        result="none", bounds=POSITIVE, work=True, eval_flag=False, recorded_as="shard_size")
    on_invalid_reward: str = setting(
        "error", "A reward that is NaN, inf or None: error (stop, naming the group and response) or drop (drop the "
        "response, counted; a group left with fewer than 2 responses is dropped whole). A reward that raises or "
        "returns the wrong number of scores is always an error.", choices=("error", "drop"), eval_flag=False)
    # A served reward's answers do not depend on how long or how often it is asked.
    http_timeout: float = setting(60.0, "Served rewards (http:// specs): seconds to wait for one answer.",
                                  result="none", bounds=POSITIVE, in_legacy_key=False)
    http_retries: int = setting(
        4, "Served rewards: retries of a request answered with a 5xx, timed out or whose connection failed, after "
        "0.5 s, 1 s, 2 s ... (at most 30 s); then score stops, naming the endpoint.",
        result="none", bounds=NON_NEGATIVE, in_legacy_key=False)
    http_concurrency: int = setting(
        4, "Served rewards: requests in flight at once (each of reward_batch_size responses; of one conversation for "
        "vllm+ chat endpoints).", result="none", bounds=POSITIVE, in_legacy_key=False)
    out: str = setting("scored.parquet", "Output file.", path="output", result="none", run_sets=True,
                       eval_flag=False)


@dataclass
class TrainSettings:
    policy: str = setting("", "Policy to train; empty: the reference the file was scored with.", path="model",
                          result="content", run_sets=True)
    weights: dict[str, float] = setting(
        {}, "Weight per reward name, e.g. helpful=0.7,harmless=0.3; normalised to sum 1. Empty: equal weights.",
        bounds=NON_NEGATIVE)
    loss: str = setting("rpo-sym", "rpo-sym (symmetric, lower variance), rpo (paper Eq. 19) or rebel (squared).",
                        choices=("rpo-sym", "rpo", "rebel"))
    beta: float = setting(0.1, "KL strength: the optimum is pi_ref * exp(r_w / beta).", bounds=POSITIVE)
    normalize: str = setting(
        "zscore", "zscore: standardise every reward with one stored mean/std (see reward_stats), so that weights mean "
        "the same thing whatever each reward's scale; none: raw rewards.", choices=("zscore", "none"))
    reward_stats: str = setting(
        "", "The scored file whose stored reward mean/std z-score every input file (one target for all of them). "
        "Empty: the first input file's. `run` sets it to round-000/scored.parquet.", path="output",
        run_sets=True)
    lr: float = setting(1e-5, "Peak learning rate (AdamW). LoRA usually wants ~1e-4.", bounds=POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay.", bounds=NON_NEGATIVE)
    epochs: int = setting(1, "Passes over the groups.", bounds=POSITIVE)
    pairs: str = setting(
        "all", "How a group's responses are paired: all (every i < j), disjoint ((1,2), (3,4), ...: each response in "
        "one pair), max-min (the highest vs the lowest weighted reward, as RLHFlow builds DPO data; it biases the "
        "target away from pi*: the pair kept is selected by its reward gap, so its teacher margins are larger than "
        "those of pairs drawn from the policy). Equal for N = 2. Responses with identical ids give no pair.",
        choices=("all", "disjoint", "max-min"))
    # A resumed state must share the global batch, batch_size * grad_accum * processes (train.run_fingerprint).
    batch_size: int = setting(
        8, "Groups (prompts) per micro-batch, unless micro_batch_tokens cuts by tokens (on a GPU by default); times "
        "grad_accum (and the processes), the groups of one optimizer step. Each response of a group is forwarded "
        "once.", bounds=POSITIVE, resume_free=True, resume_if=GLOBAL_BATCH)
    # How a step is cut into forwards, never what it computes (the same groups, normalisation and gradient).
    micro_batch_tokens: int = setting(
        0, "Token budget of one forward (prompt once, every response): a step's groups, in order, are cut into "
        "micro-batches of whole groups within it. The step (batch_size * grad_accum groups) and its gradient stay "
        "the same. 0: on a GPU, sized from free memory; on a CPU, batch_size groups per micro-batch.",
        bounds=NON_NEGATIVE, result="none", in_legacy_key=False)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", bounds=POSITIVE, resume_free=True,
                              resume_if=GLOBAL_BATCH)
    warmup_ratio: float = setting(0.1, "Fraction of optimizer steps of linear warmup before the schedule.",
                                  bounds=(("[0, 1)", ""),))
    lr_schedule: str = setting(
        "cosine", "After warmup: cosine (decay to 0 at the last step) or constant (the peak lr to the end). A `run` "
        "trains each round as its own job, so either schedule starts again every round.",
        # cosine is what training did before the setting existed: recorded only when it is another
        choices=("cosine", "constant"), unrecorded_at="cosine")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0: off).", bounds=NON_NEGATIVE)
    seed: int = setting(0, "Seed for data order and initialisation of adapters.")
    lora_r: int = setting(0, "LoRA rank; 0 trains all weights.", bounds=NON_NEGATIVE)
    # 0 would train an adapter that is exactly nothing (its update is scaled by alpha / r), and say so nowhere.
    lora_alpha: int = setting(16, "LoRA alpha.", bounds=POSITIVE)
    lora_dropout: float = setting(0.0, "LoRA dropout (train turns every dropout off: set for the record only).",
                                  bounds=(("[0, 1)", ""),))
    lora_targets: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names LoRA adapts.")
    lora_layers: int = setting(
        0, "With LoRA, adapt only the last N transformer layers (0: all); backprop then stops below them.",
        bounds=NON_NEGATIVE)
    merge: bool = setting(False, "With LoRA, also write merged full weights to OUT/merged.", result="none")
    gradient_checkpointing: bool = setting(False, "Trade compute for activation memory.")
    compile: bool = setting(
        False, "Compile the policy with torch.compile: faster steps on a GPU once compiled (the first steps, and each "
        "new micro-batch shape, wait for the compiler). Same losses within float rounding.",
        result="none", in_legacy_key=False)
    log_every: int = setting(1, "Optimizer steps between metrics lines (the first and last step always).",
                             result="none", bounds=POSITIVE)
    save_every: int = setting(50, "Optimizer steps between resumable state saves (0: only at the end).",
                              result="none", bounds=NON_NEGATIVE)
    report_to: str = setting(
        "none", "Experiment trackers that also get every metrics line and the settings: none, tensorboard "
        "(OUT/runs/), wandb, mlflow, trackio, all (those installed); comma-separated for several. metrics.jsonl "
        "is written either way.", result="none")
    out: str = setting("checkpoints", "Output directory (final/, state/, metrics.jsonl).", path="output",
                       result="none", run_sets=True)


@dataclass
class RunSettings:
    """[run]: iterative rounds in a run directory (`modpo-pipe run`); see modpo_pipe/rounds.py."""

    rounds: int = setting(3, "Rounds of generate -> score -> train; round k+1 samples with round k's trained policy.",
                          bounds=((">= 1", ""),), result="none")
    # An input, but resolved like an output: always against the TOML's directory, so a typo is reported with
    # the full path it looked at.
    prompts: str = setting("", "Prompts every round samples from (JSONL, Parquet, a datasets dir, or a Hub dataset id "
                           "read with [generate].split and the [generate] *_field settings).", path="prompts",
                           result="content")
    prompts_per_round: int = setting(
        0, "0: every round uses all prompts; N: round k uses the next N prompts (a slice rotating through the file).",
        bounds=NON_NEGATIVE, result="content")
    reference: str = setting(
        "fixed", "fixed: score every round against the initial policy ([score].ref when set, else "
        "[generate].policy); previous: against the policy that sampled the round.", choices=("fixed", "previous"))
    replay: int = setting(
        0, "Earlier rounds whose scored pairs round k also trains on: 0 none, N the last N, -1 all "
        "(needs reference = fixed).", bounds=((">= -1", "-1: all, 0: none, N > 0: the last N"),))
    keep_train_state: bool = setting(
        False, "Keep each finished round's resumable training state (optimizer moments; several times the "
        "model's size) instead of deleting it once the round's policy is written.", result="none")
    shards: int = setting(
        1, "N > 1: each round's generate and score are split into N shards, computed by `modpo-pipe run --shard "
        "I/N` workers (any batch system, hosts sharing the run directory); the plain `run` opens those stages, "
        "merges the shards and trains. The result does not depend on N.", bounds=((">= 1", ""),), result="none")
    max_failures: int = setting(
        3, "A stage that failed or died (killed, or ended from inside) this many times in a row is not tried "
        "again: every `run` exits 1 naming it and its log (RUN/round-NNN/STAGE.log) until `run --retry`. 0: retry "
        "forever.", bounds=((">= 0", "0: retry forever"),), result="none")


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "generate": GenerateSettings,
    "score": ScoreSettings,
    "train": TrainSettings,
    "run": RunSettings,
}
SECTION_FIELDS: dict[str, dict[str, dataclasses.Field]] = {
    name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


@dataclass
class Settings:
    model: ModelSettings
    generate: GenerateSettings
    score: ScoreSettings
    train: TrainSettings
    config_path: Path | None = None
    run: RunSettings = field(default_factory=RunSettings)


def prompt_fields(g: GenerateSettings) -> PromptFields:
    return PromptFields(g.split, g.prompt_field, g.messages_field, g.id_field)


def flag_name(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def flag_aliases(f: dataclasses.Field) -> tuple[str, ...]:
    """Other flags of the same setting: the name fingerprints record it as (roles.Role.recorded_as)."""
    other = role(f).recorded_as
    return ("--" + other.replace("_", "-"),) if other else ()


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _resolve_path(value: str, kind: str | None, base: Path) -> str:
    if not value or kind is None:
        return value
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    if kind == "prompts" and not candidate.exists() and is_hub_id(value):
        return value  # a Hub dataset id
    if kind in ("output", "prompts") or candidate.exists():
        return str(candidate)
    return value  # not local: a hub id


def _resolve_reward_spec(spec: str, base: Path) -> str:
    if is_served(spec):  # a URL: no path to resolve
        return spec
    if not spec.startswith("py:"):
        return _resolve_path(spec, "model", base)
    module, sep, function = spec[len("py:"):].rpartition(":")
    if module.endswith(".py"):  # a file: relative to where the spec was written
        return f"py:{_resolve_path(module, 'model', base)}{sep}{function}"
    return spec


def _section_from_mapping(name: str, raw: dict[str, Any], source: str, base: Path) -> dict[str, Any]:
    cls = SECTIONS[name]
    types = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    raw = _recorded_names(name, _legacy_keys(name, raw, source), source)
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModpoError(f"{source}: unknown key [{name}].{key}{hint}")
        value = coerce(value, types[key], f"{source}: [{name}].{key}")
        kind = fields[key].metadata.get("path")
        if kind and isinstance(value, str):
            value = _resolve_path(value, kind, base)
        elif name == "score" and key == "rewards":
            value = {k: _resolve_reward_spec(v, base) for k, v in value.items()}
        out[key] = value
    return out


def _recorded_names(section: str, raw: dict[str, Any], source: str) -> dict[str, Any]:
    """A setting given under the name fingerprints record it as (roles.Role.recorded_as) is that setting."""
    raw = dict(raw)
    for key, f in SECTION_FIELDS[section].items():
        other = role(f).recorded_as
        if other is None or other not in raw:
            continue
        if key in raw:
            raise ModpoError(f"{source}: [{section}].{key} and {other} (the same setting) are both set; keep {key}")
        raw[key] = raw.pop(other)
    return raw


def _legacy_keys(section: str, raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Keys older settings files hold, read as what replaced them (said once on stderr, never silently)."""
    if section != "generate" or "pairs_per_prompt" not in raw:
        return raw
    raw = dict(raw)
    pairs = coerce(raw.pop("pairs_per_prompt"), int, f"{source}: [generate].pairs_per_prompt")
    if "samples_per_prompt" in raw:
        raise ModpoError(f"{source}: [generate].pairs_per_prompt and samples_per_prompt are both set; keep "
                         f"samples_per_prompt (pairs_per_prompt = P meant samples_per_prompt = 2P)")
    if pairs <= 0:
        raise ModpoError(f"{source}: [generate].pairs_per_prompt must be > 0; got {pairs}")
    raw["samples_per_prompt"] = 2 * pairs
    print(f"WARNING: {source}: [generate].pairs_per_prompt = {pairs} is replaced by samples_per_prompt; read as "
          f"samples_per_prompt = {2 * pairs}" + (" (train --pairs disjoint gives the same pairs as before; the default "
          "'all' pairs every two responses of a prompt)" if pairs > 1 else ""), file=sys.stderr)
    return raw


def find_config(config: Path | None) -> Path | None:
    if config is not None:
        if not config.is_file():
            raise ModpoError(f"config file not found: {config}")
        return config
    default = Path.cwd() / DEFAULT_CONFIG_NAME
    return default if default.is_file() else None


def load_settings(config: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None, *,
                  base: Settings | None = None, source: str = "command line") -> Settings:
    """Read the TOML (explicit path, else ./modpo.toml if present) or start from `base` (the Python API's
    settings=), then apply the overrides (flags, or the API's keywords: `source` names them in errors)."""
    path = find_config(config) if base is None else base.config_path
    values = {name: dataclasses.asdict(getattr(base, name)) if base else {} for name in SECTIONS}
    if base is None and path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is no error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ModpoError(f"{path}: not valid TOML: {e}") from None
        for name, table in raw.items():
            if name not in SECTIONS and not isinstance(table, dict):  # `lr = 0.001` above the first [section]
                owners = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
                hint = f" (it is a key of {', '.join(f'[{s}]' for s in owners)})" if owners else ""
                raise ModpoError(f"{path}: {name} is set outside any section; put it under its [section]{hint}")
            if name not in SECTIONS:
                close = difflib.get_close_matches(name, SECTIONS, n=1)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                raise ModpoError(f"{path}: unknown section [{name}]{hint}")
            if not isinstance(table, dict):
                raise ModpoError(f"{path}: [{name}] must be a table")
            values[name].update(_section_from_mapping(name, table, str(path), path.parent.resolve()))
    for name, given in (overrides or {}).items():
        given = {k: v for k, v in given.items() if v is not None}
        from_flags = _section_from_mapping(name, given, source, Path.cwd())
        for key, table in from_flags.items():
            dropped = [k for k in values[name].get(key, {}) if k not in table] if isinstance(table, dict) else []
            if dropped:  # replacing is how a flag picks a subset, but a user adding one entry loses the others
                print(f"WARNING: {path or 'settings'}: [{name}].{key} from the {source} replaces the file's table; "
                      f"not used: {', '.join(dropped)}", file=sys.stderr)
        values[name].update(from_flags)
    sections = {name: cls(**values[name]) for name, cls in SECTIONS.items()}
    settings = Settings(**sections, config_path=path)
    validate(settings)
    return settings


FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # the smallest normal and the largest


def choices(section: str, key: str) -> tuple[str, ...]:
    """The values a setting allows, as its declaration says."""
    return role(SECTION_FIELDS[section][key]).choices


def validate_section(values: Any, section: str) -> None:
    """Each setting of one section against its declared choices and bounds."""
    for f in dataclasses.fields(values):
        error = problem(f, getattr(values, f.name), f"[{section}].{f.name}")
        if error:
            raise ModpoError(error)


def validate(s: Settings) -> None:
    """Every section a stage reads ([run] is checked when a run starts: rounds.check_run_settings), and what no
    single declaration says."""
    for section in ("model", "generate", "score", "train"):
        validate_section(getattr(s, section), section)
    t = s.train
    for name, spec in s.score.rewards.items():
        if not spec.strip():  # it was looked for as a model directory named "" (the working directory)
            raise ModpoError(f"[score.rewards].{name} is empty: give a model directory, a Hub id or "
                             "py:FILE:FUNCTION")
        if is_served(spec):  # a malformed URL or option: said before any work
            parse_spec(spec, f"[score.rewards].{name}")
    if not FLOAT32_TINY <= t.beta <= FLOAT32_MAX:  # the loss runs in float32: 1e-300 became 0 and trained nothing
        raise ModpoError(f"[train].beta must be a float32 number, {FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}; "
                         f"got {t.beta}")
    for part in t.report_to.split(","):
        if part.strip() not in TRACKER_CHOICES:
            raise ModpoError(f"[train].report_to must be one of {', '.join(TRACKER_CHOICES)} (or several, "
                             f"comma-separated); got {t.report_to!r}")


def render_settings(settings: Settings, sections: tuple[str, ...] = tuple(SECTIONS)) -> str:
    """`settings` as a TOML file that load_settings reads back to the same values: every key of `sections`
    written (paths as given: write absolute ones, since a file's relative paths are read against its folder)."""
    lines: list[str] = []
    for name in sections:
        values = dataclasses.asdict(getattr(settings, name))
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def render_template(policy: str = "", rewards: dict[str, str] | None = None) -> str:
    """The commented `modpo.toml` that `modpo-pipe init` writes: every key, its default and what it does."""
    lines = [
        "# modpo-pipe settings. Every key can be overridden by the flag of the same name",
        "# (e.g. [train].beta by `modpo-pipe train --beta 0.2`). Relative paths are relative to this file.",
        "",
    ]
    rewards = rewards or {}
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        tables: list[str] = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if name == "generate" and f.name == "policy" and policy:
                default = policy
            if isinstance(default, dict):
                tables.append(f.name)
                continue
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {toml_value(default)}")
        lines.append("")
        for table in tables:
            f = next(f for f in dataclasses.fields(cls) if f.name == table)
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"[{name}.{table}]")
            if table == "rewards":
                for rname, spec in rewards.items():
                    lines.append(f"{rname} = {toml_value(spec)}")
                if not rewards:
                    lines.append('# helpful = "path/to/reward-model"')
                    lines.append('# concise = "py:modpo_pipe.builtin_rewards:concision"')
                    lines.append('# judge = "vllm+http://localhost:8000/classify#revision=v1"')
            else:
                lines.append("# helpful = 0.7")
                lines.append("# harmless = 0.3")
            lines.append("")
    return "\n".join(lines)


def _markdown_cell(text: str) -> str:
    # Help strings are plain text: keep `|` from ending the cell and `*` from starting emphasis.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def reference_markdown() -> str:
    """docs/configuration.md: every section and key `render_template` writes, with its default, flag and help.

    `python docs/gen_config.py` writes it; tests/test_docs.py checks the file is this text."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the settings in modpo_pipe/config.py: do not edit by hand. Regenerate with",
        "     `python docs/gen_config.py` (tests/test_docs.py fails while this file is stale). -->",
        "",
        "Generated from the settings' own help strings (`modpo_pipe/config.py`); regenerate it with",
        "`python docs/gen_config.py`. `modpo-pipe init [FILE]` writes the same keys and defaults, each with its",
        "help as a comment, into `modpo.toml`.",
        "",
        "Relative paths in the file are relative to the file; flags override the file, and paths given as flags",
        "are relative to the current directory. Every key has the flag of the same name on the commands that",
        "read its section (`[train].beta`: `modpo-pipe train --beta 0.2`); `run` and `status` take the",
        "[generate], [score] and [train] flags with their section as prefix (`--train-beta 0.2`,",
        "`--score-reward NAME=SPEC`), and set each round's outputs, `[train].policy` and `[train].reward_stats`",
        "themselves. Tables (`[score.rewards]`, `[train.weights]`) take `NAME=VALUE` flags, repeated or",
        "comma-separated, and replace the file's table whole (a warning names the entries left out); a",
        "boolean's flag also has a `--no-` form (`--no-chat-template`).",
        "",
        "*Changes results* says what a change of the setting does to finished work: yes (a `run` redoes the",
        "finished stages it changes, after asking for `--allow-config-change`), by content (the content of the",
        "model or prompts it names is compared, not the name), or no (never redone); and which settings a",
        "killed generate, score or train may resume under when they change.",
        "",
    ]
    for name, cls in SECTIONS.items():
        doc = (cls.__doc__ or "").strip()
        lines += [f"## [{name}]", ""]
        if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring
            lines += [doc, ""]
        lines += ["| key | default | flag | changes results | what it does |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = "{}" if default == {} else toml_value(default)
            lines.append(f"| `{f.name}` | `{value}` | `{flag_name(f)}` | {described(role(f))} | "
                         f"{_markdown_cell(f.metadata['help'])} |")
        lines.append("")
    return "\n".join(lines)
