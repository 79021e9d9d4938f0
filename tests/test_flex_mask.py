"""The packed row's mask as a FlexAttention BlockMask: the same rule as the dense 4D mask, and the same log-probs
through transformers' flex_attention implementation as through SDPA (on CPU, where torch runs flex attention's
forward; its backward is CUDA only, so the gradients are compared by the GPU check)."""

from __future__ import annotations

import pytest
import torch

from modpo_pipe.logprobs import build_batch, can_pack, pack_sequences, packed_sequence_logps, sequence_logps

PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [10, 11], [10, 11], [12, 13, 14], [], [40]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26, 27], [3], [30, 31, 32], [33], [34, 35], [36, 37], [38, 39, 41]]


def test_block_mask_holds_exactly_the_dense_masks_rule():
    from torch.nn.attention.flex_attention import create_mask

    packed = pack_sequences(PROMPTS, RESPONSES, pad_id=0, width=16)  # several groups per row, and padding
    rows, width = packed.input_ids.shape
    assert rows >= 2 and (packed.group < 0).any()
    block_mask = packed.block_mask()
    dense = create_mask(block_mask.mask_mod, rows, 1, width, width, device="cpu")
    assert dense.dtype == torch.bool and torch.equal(dense, packed.attention_mask())


@pytest.fixture(scope="module")
def models(tiny):
    from transformers import AutoModelForCausalLM

    loaded = {impl: AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32,
                                                         attn_implementation=impl).eval()
              for impl in ("sdpa", "flex_attention")}
    assert loaded["flex_attention"].config._attn_implementation == "flex_attention"
    return loaded


@pytest.mark.slow  # flex attention compiles on first use: 20 to 50 s on a CPU
@torch.inference_mode()
def test_flex_attention_log_probs_equal_sdpa(models, monkeypatch):
    """One packed layout (the one train's forward lays out), so that flex attention compiles once: on CPU,
    inductor's code for flex attention at dynamic shapes does not compile (torch 2.13)."""
    from modpo_pipe import logprobs

    assert can_pack(models["flex_attention"])
    packed = pack_sequences(PROMPTS, RESPONSES, pad_id=1)
    built = []
    real = logprobs.PackedBatch.block_mask
    monkeypatch.setattr(logprobs.PackedBatch, "block_mask", lambda self: built.append(1) or real(self))
    flex = packed_sequence_logps(models["flex_attention"], packed)
    sdpa = packed_sequence_logps(models["sdpa"], packed)
    assert built  # the flex model got a BlockMask, not the dense mask
    assert torch.allclose(flex, sdpa, atol=1e-5), (flex - sdpa).abs().max()
    # train's entry point packs the same rows and takes the same path
    through_train = sequence_logps(models["flex_attention"], build_batch(PROMPTS, RESPONSES, pad_id=1))
    assert len(built) == 2 and torch.allclose(through_train, sdpa, atol=1e-5)
