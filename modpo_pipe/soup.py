"""Rewarded soups (Ramé et al. 2023): interpolate the weights of two policies trained for different objectives,
theta(lambda) = (1 - lambda) theta_A + lambda theta_B, the usual baseline front beside one trained policy per
weight vector.

`soup(A, B, lambdas, out)` writes OUT/soup-LAMBDA/ per lambda: A's config and tokenizer files, the interpolated
weights (safetensors, written to a temporary directory and renamed into place) and a modpo_pipe.json that
`eval` reads (the family, lambda, and the weight vector interpolated the same way). A and B must be full
weights (a LoRA run's merged/ directory, not its adapter) of the same architecture, with the same tokenizer
and the same tensors.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from modpo_pipe import storage
from modpo_pipe.errors import ModpoError

# config.json keys that do not change what the weights mean.
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}
_NOT_COPIED = {"modpo_pipe.json", "README.md", "model.safetensors.index.json"}
FAMILY = "rewarded soups"


def soup_dir_name(lam: float) -> str:
    return f"soup-{lam:.2f}"


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def check_policy(path: Path) -> None:
    if not path.is_dir():
        raise ModpoError(f"soup: {path}: no such model directory")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ModpoError(f"soup: {path} holds a LoRA adapter, not full weights; soup the merged weights "
                         f"(`train --merge` writes OUT/merged)")
    if not (path / "config.json").is_file() or not _weight_files(path):
        raise ModpoError(f"soup: {path}: no config.json and safetensors weights (not a full-weights model directory)")


def _config(path: Path) -> dict[str, Any]:
    return {k: v for k, v in storage.read_json_object(path / "config.json").items() if k not in _CONFIG_IGNORED}


def _tensor_index(path: Path) -> dict[str, tuple[Path, list[int], str]]:
    """Tensor name -> (file, shape, dtype), over every safetensors file of the directory."""
    from safetensors import safe_open

    index: dict[str, tuple[Path, list[int], str]] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    sl = f.get_slice(name)
                    index[name] = (file, list(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors' own SafetensorError: a truncated or damaged file
            raise ModpoError(f"soup: {file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return index


def check_compatible(a: Path, b: Path, trust_remote_code: bool = False) -> dict[str, tuple[Path, list[int], str]]:
    """Refuse, in one line, two policies that cannot be interpolated; returns A's tensor index."""
    from modpo_pipe import models

    for path in (a, b):
        check_policy(path)
    config_a, config_b = _config(a), _config(b)
    if config_a != config_b:
        key = next(k for k in sorted(set(config_a) | set(config_b)) if config_a.get(k) != config_b.get(k))
        raise ModpoError(f"soup: {a} and {b} have different architectures (config.json {key}: "
                         f"{config_a.get(key)!r} vs {config_b.get(key)!r})")
    fingerprints = [models.tokenizer_fingerprint(models.load_tokenizer(str(p), trust_remote_code)) for p in (a, b)]
    if fingerprints[0] != fingerprints[1]:
        raise ModpoError(f"soup: {a} and {b} use different tokenizers")
    index_a, index_b = _tensor_index(a), _tensor_index(b)
    if set(index_a) != set(index_b):
        name = sorted(set(index_a) ^ set(index_b))[0]
        raise ModpoError(f"soup: tensor {name} is in only one of {a} and {b}")
    for name, (_, shape, _) in index_a.items():
        if index_b[name][1] != shape:
            raise ModpoError(f"soup: tensor {name} has shape {shape} in {a} but {index_b[name][1]} in {b}")
    return index_a


def interpolate(tensor_a: Any, tensor_b: Any, lam: float) -> Any:
    """(1 - lam) a + lam b, computed in float32 and stored in a's dtype; integer tensors must agree."""
    import torch

    if not tensor_a.is_floating_point():
        if not torch.equal(tensor_a, tensor_b):
            raise ModpoError("soup: a non-float tensor differs between the two policies")
        return tensor_a
    mixed = (1.0 - lam) * tensor_a.float() + lam * tensor_b.float()
    return mixed.to(tensor_a.dtype).contiguous()


def _weights_info(path: Path) -> dict[str, Any]:
    info = path / "modpo_pipe.json"
    return storage.read_json_object(info) if info.is_file() else {}


def soup(a: Path, b: Path, lambdas: list[float], out: Path, trust_remote_code: bool = False) -> list[Path]:
    """Write one interpolated policy per lambda into OUT/soup-LAMBDA/; returns their directories."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if not lambdas:
        raise ModpoError("soup: --lambdas is empty")
    bad = [lam for lam in lambdas if not 0.0 <= lam <= 1.0]
    if bad:
        raise ModpoError(f"soup: every lambda must be in [0, 1] (interpolation, not extrapolation); got {bad[0]}")
    names: dict[str, float] = {}  # directory name -> the lambda that writes it
    for lam in lambdas:
        name = soup_dir_name(lam)
        if name in names:
            raise ModpoError(f"soup: lambdas {names[name]:g} and {lam:g} would both write {name}; give lambdas "
                             "that differ in their first two decimals")
        names[name] = lam
    if out.exists() and not out.is_dir():
        raise ModpoError(f"soup: --out {out} is a file; give a directory (it gets one soup-LAMBDA/ per lambda)")
    a, b = Path(a).resolve(), Path(b).resolve()
    index = check_compatible(a, b, trust_remote_code)
    files_b = {name: file for name, (file, _, _) in _tensor_index(b).items()}
    weights_a, weights_b = _weights_info(a).get("weights"), _weights_info(b).get("weights")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for lam in lambdas:
        target = out / soup_dir_name(lam)
        tmp = out / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for f in a.iterdir():
                if f.is_file() and f.suffix != ".safetensors" and f.name not in _NOT_COPIED:
                    shutil.copy2(f, tmp / f.name)
            with contextlib.ExitStack() as stack:
                handles = {file: stack.enter_context(safe_open(str(file), framework="pt"))
                           for file in {file for file, _, _ in index.values()} | set(files_b.values())}
                tensors = {name: interpolate(handles[file_a].get_tensor(name), handles[files_b[name]].get_tensor(name),
                                             lam) for name, (file_a, _, _) in index.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del tensors
            info: dict[str, Any] = {"family": FAMILY, "soup": {"a": str(a), "b": str(b), "lambda": lam}}
            if weights_a and weights_b and set(weights_a) == set(weights_b):
                info["weights"] = {k: (1 - lam) * weights_a[k] + lam * weights_b[k] for k in weights_a}
            (tmp / "modpo_pipe.json").write_text(json.dumps(info, indent=2))
            storage.replace_dir(tmp, target, old=out / f".{target.name}.old")
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModpoError(f"soup: cannot write {target}: {e.strerror or e}") from None
        written.append(target)
    return written
