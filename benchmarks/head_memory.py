"""Peak memory of the LM head's log-probs, forward and backward, at a 128k vocabulary: the full logits, today's
row chunks (logits kept for the backward pass) and `logprobs.chunked_head_logps` (recomputed in the backward).

    python -m benchmarks.head_memory                  # CPU: peak resident memory of one process per path
    python -m benchmarks.head_memory --device cuda    # GPU: torch.cuda.max_memory_allocated

On CPU each path runs in a fresh process and reports its peak resident set (ru_maxrss) less that of a process
that builds the same inputs and stops; on CUDA, the allocator's peak less the memory held before the forward.
Not a test: a measurement, written to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PATHS = ("setup", "full logits", "row chunks (today)", "chunked + recompute")


def run_path(path: str, tokens: int, hidden: int, vocab: int, device: str) -> dict[str, float]:
    import torch

    from modpo_pipe.logprobs import chunked_head_logps, token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device)
    states = torch.randn(tokens, hidden, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    weight = torch.randn(tokens, device=device)
    # Gradients allocated up front in every path (the backward adds into them), so that the peaks differ by what
    # each path holds for and during its backward pass only.
    head.weight.grad, states.grad = torch.zeros_like(head.weight), torch.zeros_like(states)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    if path != "setup":
        if path == "full logits":
            values = token_logps(head(states), targets)
        elif path == "row chunks (today)":
            values = torch.cat([token_logps(head(states[i : i + 2048]), targets[i : i + 2048])
                                for i in range(0, tokens, 2048)])  # _head_logps below the recompute threshold
        else:
            values = chunked_head_logps(head, states, targets)
        (values * weight).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_bytes": float(peak), "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="response tokens in one forward")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256, help="Llama 3's vocabulary")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process of one CPU path
    args = parser.parse_args(argv)
    sizes = (args.tokens, args.hidden, args.vocab)
    if args.one:
        print(json.dumps(run_path(args.one, *sizes, args.device)))
        return 0
    results = {}
    for path in PATHS:
        if args.device == "cuda":
            results[path] = run_path(path, *sizes, "cuda")
            continue
        out = subprocess.run([sys.executable, "-m", "benchmarks.head_memory", "--device", "cpu", "--one", path,
                              "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab",
                              str(args.vocab)], capture_output=True, text=True, check=True)
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["setup"]["peak_bytes"] if args.device == "cpu" else 0.0
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"LM head log-probs, forward + backward, float32 on {args.device}: {args.tokens} tokens, hidden "
          f"{args.hidden}, vocabulary {args.vocab:,} (one float32 logits tensor: {logits_mib:,.0f} MiB)\n")
    print("| path | peak memory above the inputs (MiB) | seconds |\n|---|---|---|")
    for path in PATHS[1:]:
        print(f"| {path} | {(results[path]['peak_bytes'] - base) / 2**20:,.0f} | {results[path]['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
