"""The generate variants: ours (modpo_pipe.generate.hf.sample_transformers), the baseline (one prompt per
`generate` call), and the vLLM backend where vLLM is installed; generated tokens per second."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from benchmarks.run.measure import clock, since
from benchmarks.run.workload import Size, make_pairs, workload_settings
from benchmarks.synthetic import EOS_ID, PAD_ID


def _generation_model(spec: dict[str, Any], size: Size):
    """The policy with a constant bias on the EOS logit, so sampled lengths spread around gen_mean_tokens
    (a random-init model would otherwise never stop) for both the baseline and ours."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval()
    probe = torch.tensor([make_pairs(size, 1)[0].prompt_ids])
    with torch.inference_mode():
        lse = torch.logsumexp(model(input_ids=probe).logits[0].float(), -1).mean().item()
    bias = lse - math.log(max(size.gen_mean_tokens - 1, 1))  # p(EOS) ~ 1 / mean length

    def add_bias(module: Any, args: Any, output: Any) -> Any:
        output[..., EOS_ID] += bias
        return output

    model.get_output_embeddings().register_forward_hook(add_bias)
    return model


def _gen_prompts(size: Size) -> list[list[int]]:
    return [p.prompt_ids for p in make_pairs(size, size.gen_prompts)]


def child_generate_ours(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from modpo_pipe.config import GenerateSettings
    from modpo_pipe.generate.hf import sample_transformers

    model = _generation_model(spec, size)
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    prompts = _gen_prompts(size)
    t = clock()
    samples = sample_transformers(model, tokenizer, prompts, size.gen_n, temperature=1.0, top_p=1.0,
                                  max_new_tokens=size.gen_max_new_tokens, seed=size.seed,
                                  batch_size=GenerateSettings().batch_size, progress=False)
    return _gen_result([len(s.ids) for per_prompt in samples for s in per_prompt], *since(t))


def _gen_result(lengths: list[int], wall: float, cpu: float) -> dict[str, Any]:
    return {"tokens": sum(lengths), "seconds": wall, "cpu_seconds": cpu, "tokens_per_s": sum(lengths) / wall,
            "cpu_tokens_per_s": sum(lengths) / cpu, "mean_length": statistics.fmean(lengths),
            "max_length": max(lengths)}


def child_generate_baseline(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    """One prompt per `generate` call (its n samples together), plain multinomial sampling."""
    import torch

    model = _generation_model(spec, size)
    prompts = _gen_prompts(size)
    torch.manual_seed(size.seed)
    lengths = []
    t = clock()
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=size.gen_max_new_tokens, num_return_sequences=size.gen_n,
                                 pad_token_id=PAD_ID, eos_token_id=EOS_ID)
            for row in out[:, len(prompt):].tolist():
                lengths.append(row.index(EOS_ID) + 1 if EOS_ID in row else len(row))
    return _gen_result(lengths, *since(t))


def child_generate_vllm(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    """modpo_pipe.generate.sample with the vLLM backend, timed after a one-token call has started the engine
    (the start is reported apart). vLLM sees no EOS bias: its responses run to the token limit."""
    import importlib.util

    if not size.vllm:
        return {"skipped": f"vLLM is not run at size {size.name!r}"}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from modpo_pipe.generate import sample

    prompts = _gen_prompts(size)
    settings = workload_settings(spec)
    settings.generate.seed = size.seed
    settings.generate.vllm_max_model_len = max(len(p) for p in prompts) + size.gen_max_new_tokens
    settings.model.dtype = "float32"
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    start = clock()
    settings.generate.max_new_tokens = 1
    sample(settings, spec["policy"], tokenizer, prompts[:1], 1, "vllm", progress=False)
    engine_start_s = since(start)[0]
    settings.generate.max_new_tokens = size.gen_max_new_tokens
    t = clock()
    samples = sample(settings, spec["policy"], tokenizer, prompts, size.gen_n, "vllm", progress=False)
    result = _gen_result([len(s.ids) for per_prompt in samples for s in per_prompt], *since(t))
    del result["cpu_tokens_per_s"]  # the engine computes in processes of its own: no CPU-time figure here
    return {**result, "engine_start_s": engine_start_s}
