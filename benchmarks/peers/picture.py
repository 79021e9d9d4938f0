"""The frontier's picture: reward against KL to the reference, one panel per objective (positivity-only, middle,
concision-only), a line per method (modpo-pipe across its betas, GRPO along each run), a line style per seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.peers.frontier import OBJECTIVE, PIPELINE, curve, grpo_methods, members, reward_estimate

PANELS = ((1.0, "positivity-only", "positivity"), (0.5, "middle", "½ pos. + ½ concision"),
          (0.0, "concision-only", "concision"))
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
STYLES = ("-", "--", ":", "-.")


def plot_curves(datas: list[dict[str, Any]], path: Path) -> Path:
    """One PNG of every seed's curves (the frontier.json contents in `datas`), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from modpo_pipe import storage

    methods = list(dict.fromkeys(m for d in datas for m in [PIPELINE, *grpo_methods(d)]))
    colors = dict(zip(methods, COLORS))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 4.8), dpi=120)
    for ax, (w, title, y_label) in zip(axes, PANELS):
        for data, style in zip(datas, STYLES):
            seed = data["settings"]["seed"]
            for method in methods:
                if not members(data, method, w):
                    continue
                points = curve(data, method, w, OBJECTIVE)
                ax.errorbar([p.kl for p in points], [p.mean for p in points], yerr=[p.sem for p in points],
                            fmt="o", linestyle=style, color=colors[method], markersize=4, capsize=2, linewidth=1.2,
                            label=f"{method}, seed {seed}")
                if method == PIPELINE:  # which beta each point is
                    betas = {p["label"]: p["beta"] for p in members(data, method, w)}
                    for p in (p for p in points if p.label in betas):
                        ax.annotate(f"β {betas[p.label]:g}", (p.kl, p.mean), textcoords="offset points",
                                    xytext=(4, 4), fontsize=7, color=colors[method])
            ref_mean, _ = reward_estimate(data["summaries"][data["reference"]], OBJECTIVE, w)
            ax.plot([0.0], [ref_mean], "*", color="black", markersize=12, zorder=3)
        ax.set_xscale("symlog", linthresh=1.0)  # GRPO's runs reach KL 100 and more; the pipeline sits at 1 to 10
        ax.set_xlabel("KL to the reference (nats, estimated from the policy's replies)")
        ax.set_ylabel(f"{y_label}, held-out mean ± s.e.")
        ax.set_title(f"{title} (w_positivity {w:g})")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=7)
    fig.suptitle("Reward against KL: modpo-pipe (one point per β) and GRPO (one point per checkpoint); ★ reference")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    storage.fsync_replace(tmp, path)
    return path
