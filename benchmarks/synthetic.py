"""What every benchmark here builds its models from: Llama shapes, a word-level tokenizer whose text maps to
ids one to one, and a random-init policy saved beside it. Nothing is downloaded.

Used by benchmarks.run (the stage benchmarks), benchmarks.groups and benchmarks.gpu_check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, Any]:
    """LlamaConfig keyword arguments of one shape."""
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads,
            "vocab_size": vocab, "max_position_embeddings": 2048, "tie_word_embeddings": True,
            "rope_theta": 100000.0, "rms_norm_eps": 1e-5}


SMOLLM2_135M = llama(576, 1536, 30, 9, 3, 49152)  # SmolLM2-135M's shape: 134.5M parameters
TINY = llama(64, 128, 2, 2, 1, 512)  # the CI smoke tests' shape: mechanics in seconds

# Vocabulary of the synthetic tokenizer: specials, then one word per id ("w123"), so text <-> ids is 1:1.
_SPECIALS = ["<pad>", "<eos>", "<unk>", "user:", "assistant:"]
FIRST_WORD = len(_SPECIALS)  # the first id that is a word (random token ids start here)
PAD_ID, EOS_ID = 0, 1
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                      unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_policy(path: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """A random-init Llama of `shape` (torch seeded with `seed`) in float32 safetensors at `path`, with the
    word-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    make_tokenizer(shape["vocab_size"]).save_pretrained(path)
    return path
