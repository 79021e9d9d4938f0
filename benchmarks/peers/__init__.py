"""The peer benchmark against TRL's GRPOTrainer, in parts (the entry point is benchmarks/peers_grpo.py):

  grpo.py          TRL's side: the demo's rewards as TRL reward functions, GRPOTrainer built with the shared
                   settings, the training clock (saves not counted), policies saved at budgets or steps
  frontier.py      pure: curves of (KL, reward), reward at matched KL, KL-budgeted hypervolume, the cost of a
                   whole front, the outcome checks of issue 34 and their report
  frontier_run.py  `--frontier`: the pipeline at several betas, GRPO runs with checkpoints, one evaluation
                   of every policy, frontier.json, frontier.md and the picture; `--combine` over seeds
"""

from collections.abc import Callable

WEIGHTS = (0.0, 0.5, 1.0)  # w_positivity of the three policies on each side; w_concision = 1 - w
REWARD_NAMES = ("positivity", "concision")


def report_or_error(make_report: Callable[[], str]) -> int:
    """A benchmark's exit: its report printed (0), or a ModpoError as one `error:` line (1)."""
    import sys

    from modpo_pipe.errors import ModpoError

    sys.stdout.reconfigure(line_buffering=True)  # TRL's per-step logs, live in a log file too
    try:
        report = make_report()
    except ModpoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0
