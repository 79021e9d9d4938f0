"""Loading policies, references, reward models and tokenizers safely, and fingerprinting them.

Safe by default: safetensors weights only (no pickle), `trust_remote_code` only when the user asks.
A directory holding a LoRA adapter (adapter_config.json) loads as its base model with the adapter
merged, so a LoRA-trained round can sample and score the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from modpo_pipe import storage
from modpo_pipe.errors import ModpoError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModpoError(f"[model].device: not a device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModpoError(f"[model].device is {name!r} but no CUDA device is available")
    if device.type == "meta":  # shapes without data: nothing can be sampled or trained on it
        raise ModpoError(f"[model].device: {name!r} holds no data; use cpu, cuda or auto")
    if device.type not in ("cpu", "cuda"):
        # mps, xpu, hpu, ...: torch parses any name it knows and failed later, on the first tensor, with a traceback
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError, ImportError):  # each backend says 'not here' its own way
            raise ModpoError(f"[model].device is {name!r} but this torch build or machine has no {device.type} "
                             "device") from None
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPU bf16 is slower here and costs log-prob precision
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")


def fingerprint(path_or_id: str) -> str:
    """Content fingerprint of a model directory (config, weights, tokenizer files); hub ids use their
    cached snapshot when there is one, else the id itself (marked as such)."""
    path = Path(path_or_id)
    if not path.is_dir():
        snapshot = _cached_snapshot(path_or_id)
        if snapshot is None:
            return "id:" + path_or_id
        path = snapshot
    return storage.dir_fingerprint(path, _FINGERPRINT_SUFFIXES)


def fetch(path_or_id: str) -> None:
    """Bring a Hub model that is not in the local cache into it: the files fingerprint() hashes, which are the
    files loading reads (safetensors only). A local directory or a cached model: nothing to do."""
    from modpo_pipe.prompts import is_hub_id

    if Path(path_or_id).exists() or not is_hub_id(path_or_id) or _cached_snapshot(path_or_id) is not None:
        return  # a local path (a missing one is the stage's to report, naming the setting)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(path_or_id, allow_patterns=[f"*{suffix}" for suffix in _FINGERPRINT_SUFFIXES])
    except Exception as e:  # offline, no such repository, no access
        raise ModpoError(f"{path_or_id}: not a local directory, not in the Hugging Face cache, and not "
                         f"downloadable ({type(e).__name__}: {_first_line(e)})") from None


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        return None


def identity(path_or_id: str) -> dict[str, str]:
    """What metadata records about a model: where it came from and what it contained."""
    return {"path": str(path_or_id), "fingerprint": fingerprint(path_or_id)}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Fingerprint of what maps text to ids (vocabulary, merges, normalisation, special tokens); the chat
    template is left out since stored ids, not rendering, are what later stages depend on."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    text += json.dumps(
        {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def adapter_base(path_or_id: str) -> str | None:
    """The base model an adapter directory names; None for anything that is not an adapter directory."""
    config = Path(path_or_id) / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError):
        raise ModpoError(f"{config}: not an adapter config naming its base_model_name_or_path") from None
    if not isinstance(base, str) or not base:
        raise ModpoError(f"{config}: base_model_name_or_path is {base!r}, not a model")
    return base


def context_length(policy: str, trust_remote_code: bool = False) -> int | None:
    """A causal LM's context window in tokens, from its config (an adapter's: its base model's); None when the
    config does not say."""
    from transformers import AutoConfig

    source = policy
    adapter = Path(policy) / "adapter_config.json"
    if adapter.is_file():  # a LoRA adapter directory: the base model's config
        source = json.loads(adapter.read_text()).get("base_model_name_or_path") or policy
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # loading the model itself reports what is wrong
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Files that hold pickles: loading them can run code. (training_args.bin is Trainer's pickled settings, which
# nothing here reads; it is not weights.)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _check_loadable(path_or_id: str, what: str) -> None:
    from modpo_pipe.prompts import is_hub_id

    path = Path(path_or_id)
    # A Hub id is NAME or OWNER/NAME: anything else (q/a/b) can only be a local path, and one that is not there
    # is no model directory (the Hub's loader said "Repo id must be in the form ...").
    looks_local = path.is_absolute() or path_or_id.startswith((".", "~")) or path.exists() or not is_hub_id(path_or_id)
    if looks_local and not path.is_dir():
        raise ModpoError(f"{what}: {path_or_id}: no such model directory")
    if not path.is_dir():
        return
    is_adapter = (path / "adapter_config.json").is_file()
    if not (path / "config.json").is_file() and not is_adapter:
        raise ModpoError(f"{what}: {path_or_id}: no config.json (not a Hugging Face model directory)")
    # Any pickle in the directory is refused, even beside safetensors: which file a loader falls back to is
    # its business (peft reads adapter_model.bin when adapter_model.safetensors is missing), never ours.
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickled:
        only = "only " if not any(path.glob("*.safetensors")) else ""
        raise ModpoError(f"{what}: {path_or_id} holds {only}pickle weights ({', '.join(pickled)}), which can run "
                         "code when loaded; modpo-pipe loads safetensors only. Convert them to safetensors "
                         "with code you trust, and move the pickle files out")
    if is_adapter and not (path / ADAPTER_WEIGHTS).is_file():
        raise ModpoError(f"{what}: {path_or_id} is an adapter directory without {ADAPTER_WEIGHTS}")


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False, what: str = "tokenizer") -> Any:
    from transformers import AutoTokenizer

    _check_loadable(path_or_id, what)
    source, base = path_or_id, adapter_base(path_or_id)
    if base and not (Path(path_or_id) / "tokenizer_config.json").is_file():
        source = base
        _check_loadable(base, f"{what} (the base model of adapter {path_or_id})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        named = (f"{path_or_id}'s base model {base!r} (base_model_name_or_path in adapter_config.json)"
                 if source == base else path_or_id)
        raise ModpoError(f"{what}: cannot load tokenizer from {named}: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so any id works; EOS is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_causal_lm(
    path_or_id: str,
    *,
    dtype: torch.dtype,
    device: torch.device | None,
    trust_remote_code: bool = False,
    what: str = "policy",
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """A causal LM in eval mode; an adapter directory comes back merged into its base. `device` None: where
    the loader put it (FSDP's memory-efficient loading leaves all but one process's weights on `meta`).
    `attn_implementation`: transformers' (see `attention_implementation`); None, the library's default."""
    from transformers import AutoModelForCausalLM

    _check_loadable(path_or_id, what)
    base = adapter_base(path_or_id)
    if base is not None:
        _check_loadable(base, f"{what} (the base model of adapter {path_or_id})")
    try:
        with held_logs():
            model, loading = AutoModelForCausalLM.from_pretrained(
                base or path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                output_loading_info=True,
                **({"attn_implementation": attn_implementation} if attn_implementation else {}),
            )
            _check_head(model, loading.get("missing_keys", []), base or path_or_id, what)
        if base is not None:
            from peft import PeftModel

            # Merged, it is a plain model again: trainable like one from_pretrained (peft had frozen it all).
            model = merge_lora(PeftModel.from_pretrained(model, path_or_id)).requires_grad_(True)
    except ModpoError:
        raise
    except Exception as e:  # corrupt or truncated weights raise the loader's own types (SafetensorError...)
        kind = "" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: "
        raise ModpoError(f"{what}: cannot load {path_or_id}: {kind}{_first_line(e)}") from None
    return (model.to(device) if device is not None else model).eval()


@contextlib.contextmanager
def held_logs() -> Iterator[None]:
    """transformers' log records of the block held back: shown once the block has succeeded, dropped when it
    raises: a load that is refused (a classifier given as the policy) would otherwise print transformers'
    multi-line LOAD REPORT of missing and unexpected weights above the one line that says what is wrong."""
    import logging

    root = logging.getLogger("transformers")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, root.handlers = root.handlers, [Hold()]
    try:
        yield
    finally:
        root.handlers = handlers
    for record in held:
        root.handle(record)


def _check_head(model: torch.nn.Module, missing_keys: list[str], path_or_id: str, what: str) -> None:
    """Refuse a checkpoint without a causal-LM head (a sequence classifier, a bare encoder): transformers
    initialises the missing head at random and carries on, and that policy would sample and train noise. A
    head tied to the input embeddings is not missing: transformers leaves tied weights out of missing_keys."""
    head = model.get_output_embeddings()
    if head is None:
        return
    names = {f"{module_name}.{param_name}" for module_name, module in model.named_modules() if module is head
             for param_name, _ in module.named_parameters(recurse=False)}
    absent = sorted(names & set(missing_keys))
    if absent:
        architectures = getattr(model.config, "architectures", None) or ["?"]
        raise ModpoError(f"{what}: {path_or_id} has no causal-LM head in its weights ({', '.join(absent)} missing; "
                         f"it was saved as {', '.join(architectures)}): not a model that generates text")


def merge_lora(model: Any) -> torch.nn.Module:
    """peft's merge_and_unload computed in float32: each adapted layer's base weight is upcast, the float32 update
    added and the sum cast back to the base dtype, one layer at a time (peft itself rounds the update to a
    bfloat16 base's dtype before adding it, which loses part of a small update twice)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        dtype = base.weight.dtype
        base.weight.data = base.weight.data.float()
        module.merge()
        base.weight.data = base.weight.data.to(dtype)
    return model.unload()  # the base model, whose weights now hold the merged values


def attention_implementation(setting: str, device: torch.device) -> str | None:
    """[model].attention as transformers' attn_implementation. auto: the library's default (SDPA) on every device;
    flex attention, where packed rows skip the blocks their mask hides (logprobs.PackedBatch.block_mask), is
    asked for by name until `./dev.sh gpu-check` has measured it on a GPU (its values are tested on a CPU, its
    gradients nowhere yet). flex is refused off CUDA: torch 2.13 has no backward for it on a CPU."""
    if setting == "auto":
        return None
    if setting == "flex":
        if device.type != "cuda":
            raise ModpoError(f"[model].attention = flex needs a CUDA device (torch runs flex attention's backward "
                             f"on CUDA only), not {device.type}; use auto or sdpa")
        return "flex_attention"
    return setting  # sdpa, eager


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile every transformer layer in place (as torchtitan does), returning how many: the module tree,
    parameter names and state dict stay as they were, so saving, LoRA and the direct calls of the decoder and
    head in logprobs are unchanged. Layers are found as the decoder's `layers` list."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    layers = getattr(inner.get_decoder(), "layers", None)
    if layers is None:
        raise ModpoError(f"[train].compile: {type(inner).__name__} has no decoder layer list to compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def autocast(device: torch.device | str, dtype: torch.dtype) -> Any:
    """Compute in `dtype` (matmuls, attention) whatever the weights' dtype: how float32 master weights train in
    bfloat16. A no-op for float32."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32 and device_type != "meta")


def load_reward_model(
    path_or_id: str, *, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False, what: str
) -> tuple[torch.nn.Module, Any]:
    """A sequence-classification reward model with one output (its logit is the reward) and its own tokenizer."""
    from transformers import AutoModelForSequenceClassification

    _check_loadable(path_or_id, what)
    with held_logs():
        try:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                output_loading_info=True,
            )
        except Exception as e:  # corrupt or truncated weights raise the loader's own types (SafetensorError...)
            kind = "" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: "
            raise ModpoError(f"{what}: cannot load {path_or_id}: {kind}{_first_line(e)}") from None
        # transformers initialises weights the checkpoint lacks at random and carries on (a causal LM loaded as a
        # classifier gets a random score head): its rewards would be noise, and differ from load to load.
        missing = sorted(loading.get("missing_keys", []))
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            architectures = getattr(model.config, "architectures", None) or ["?"]
            raise ModpoError(f"{what}: {path_or_id} lacks weights of a sequence-classification reward model "
                             f"({shown} missing; it was saved as {', '.join(architectures)}): they would be random")
    if model.config.num_labels != 1:
        raise ModpoError(f"{what}: {path_or_id} has {model.config.num_labels} labels; a reward model needs exactly 1")
    tokenizer = load_tokenizer(path_or_id, trust_remote_code, what)
    if model.config.pad_token_id is None:
        # Sequence classification pools at the last non-pad token, which it finds via pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
