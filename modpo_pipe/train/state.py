"""Files: the resumable state, the trained policy, metrics.jsonl, and the fingerprint a state must match. Every
write goes to a temporary name, then a rename."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from modpo_pipe import modelcard, storage
from modpo_pipe.config import TrainSettings, as_before
from modpo_pipe.errors import ModpoError
from modpo_pipe.train.data import TrainingGroups


def run_fingerprint(data: TrainingGroups, t: TrainSettings, policy_fingerprint: str, processes: int = 1) -> str:
    """What a resumable state must match: data, policy and every setting that changes the result. The batch
    enters as the global batch only, so a state resumes under another number of processes (or another
    micro-batch size) as long as batch_size * grad_accum * processes stays the same."""
    settings = {k: v for k, v in dataclasses.asdict(t).items() if k not in ("out", "log_every", "save_every",
                                                                           "merge", "policy", "batch_size",
                                                                           "grad_accum", "report_to")
                and not as_before("train", k, v)}
    settings["global_batch"] = t.batch_size * t.grad_accum * processes
    return storage.json_fingerprint({"data": data.fingerprints, "settings": settings, "policy": policy_fingerprint,
                                     "reward_stats": data.stats.as_record() if data.stats else None})


def trained_already(out: Path, fingerprint: str, merged: bool) -> bool:
    """Whether OUT/final (and OUT/merged when asked for) hold the policy a run of this very `fingerprint` (the
    one a saved state must match: data, policy, settings) wrote. Each is renamed into place whole, its
    modpo_pipe.json in it."""
    for directory in [out / "final", *([out / "merged"] if merged else [])]:
        try:
            info = json.loads((directory / "modpo_pipe.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(info, dict) or info.get("run_fingerprint") != fingerprint:
            return False
    return True


@contextmanager
def _saving(tmp: Path, final: Path, what: str) -> Iterator[None]:
    """Write into `tmp`; on any failure (a full disk...) delete it and say that `final` is untouched."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(e)
        if reason is not None:
            before = "the previous one is untouched" if final.exists() else "there was none before"
            raise ModpoError(f"cannot save {what} to {final}: {reason}; {before}. Free space and "
                             f"rerun the same command to resume") from None
        raise


def _write_failure(e: BaseException) -> str | None:
    """Why a write failed, when `e` is a failed write: an OSError, or the SafetensorError that safetensors
    raises instead ("Error while serializing: I/O error: No space left on device (os error 28)"); else None."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, SafetensorError) and "I/O error: " in str(e):
        return str(e).split("I/O error: ", 1)[1].strip().splitlines()[0]
    return None


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               fingerprint: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _saving(tmp, path, f"the training state of step {step}"):
        _write_state(tmp, model, optimizer, step, fingerprint)
        storage.replace_dir(tmp, path)


def _write_state(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                 fingerprint: str) -> None:
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    opt = optimizer.state_dict()
    moments = {f"{idx}.{key}": value.cpu().contiguous() for idx, state in opt["state"].items()
               for key, value in state.items() if torch.is_tensor(value)}
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                "param_groups": opt["param_groups"]}))


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> int:
    """Restore weights and optimizer from a state that matches this run; returns the step to start at."""
    from safetensors.torch import load_file

    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of storage.replace_dir
    if not (path / "state.json").is_file():
        return 0
    from safetensors import SafetensorError

    # Written atomically, so only a damaged disk or a hand edit makes it unreadable: say so, in one line.
    try:
        state = json.loads((path / "state.json").read_text())
        saved_fingerprint, param_groups, step = state["fingerprint"], state["param_groups"], int(state["step"])
        if saved_fingerprint == fingerprint:
            trainable = load_file(str(path / "trainable.safetensors"))
            moments = load_file(str(path / "optimizer.safetensors"))
    except (FileNotFoundError, ValueError, KeyError, TypeError, SafetensorError) as e:  # not a flaky disk's EIO
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise ModpoError(f"{path}: unreadable training state ({reason}); delete {path} to start this training "
                         "over") from None
    if saved_fingerprint != fingerprint:
        raise ModpoError(f"{path} holds a training state for other data or settings; use another --out or "
                         f"delete {path.parent} to start over")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    return step


def save_final(path: Path, model: torch.nn.Module, tokenizer: Any, info: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> None:
    """`state_dict`: the full weights gathered from FSDP or DeepSpeed processes (None: the model's own). Full
    weights are written in `dtype` (the [model].dtype asked for; the float32 masters are cast once, and a full
    model is cast in place: saving is the last use of it); a LoRA adapter stays float32."""
    tmp = path.with_name(path.name + ".tmp")
    full_weights = not hasattr(model, "peft_config")
    if full_weights and dtype is not None:
        if state_dict is None:
            model.to(dtype)
        else:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with _saving(tmp, path, "the trained policy"):
        model.save_pretrained(str(tmp), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        if full_weights and dtype is not None and (tmp / "config.json").is_file():
            config = json.loads((tmp / "config.json").read_text())  # save_pretrained wrote the model's dtype
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(tmp))
        (tmp / "modpo_pipe.json").write_text(json.dumps(info, indent=2))
        metrics = path.parent / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        card = modelcard.model_card(info, lines, adapter=(tmp / "adapter_config.json").is_file())
        (tmp / "README.md").write_text(card, encoding="utf-8")
        storage.replace_dir(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, start_step: int) -> None:
    """Drop lines a killed run logged past its last saved state, so a resume never duplicates steps."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= start_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    storage.write_atomic(path, "".join(line + "\n" for line in keep))
