"""Every stage on one fixed synthetic workload, each against a plain baseline written here, as ratios
measured in the same run.

    python -m benchmarks.run --quick     # small model: a few minutes on 2 CPU cores
    python -m benchmarks.run             # a Llama config of SmolLM2-135M's size (about 30 min on 2 cores)

Options: --repeats N (interleave the variants N times; ratios are medians over repeats), --only
train,score,generate, --workdir DIR (keep the workload and per-variant JSON), --json FILE, --markdown.

What is compared (ours = the package's own functions; baseline = the plain loop written here):
  train     modpo_pipe.train.train on a synthetic scored.parquet (cached reference log-probs, no reference
            model) vs a step that keeps the reference model loaded and recomputes its log-probs every step,
            with y1 and y2 as two padded forwards in dataset order; full fine-tuning and LoRA.
  score     modpo_pipe.score.run_score (reference log-probs + two reward models) vs the same work in
            dataset order with pad-to-longest batches; plus the share of real (non-pad) tokens.
  generate  modpo_pipe.generate.hf.sample_transformers vs one prompt per `generate` call; vLLM when installed.
  efficiency  ours' full fine-tuning FLOP/s (6 * params * tokens) over the measured fp32 matmul FLOP/s.

Each variant runs in a child process of its own (`--child NAME`) so peak memory is its own; "peak RSS" is
the resident-set high-water mark from the end of model set-up to the end of the last step (Linux
`clear_refs`), so it counts the models, the optimizer and the step, and not the checkpoint writing that
`train` does after the loop. The whole-process ru_maxrss is reported next to it.

Where each part lives (this package):
  cli.py       the options and the parent: builds the workload, runs the variants, prints the table
  workload.py  the sizes and the synthetic workload (models, pairs.parquet, scored.parquet)
  variants.py  every variant by name, the sections, and the child process each one runs in
  train.py, score.py, generate.py   each stage's variants: ours and its baseline
  baseline.py  the plain forward the baselines share
  measure.py   clocks, peak memory, the matmul ceiling, the machine
  report.py    ratios, targets and the table
The shapes and the word-level tokenizer are benchmarks/synthetic.py's (groups.py and gpu_check.py use them too).
"""
