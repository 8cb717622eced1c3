"""``reward.png``: reward and samples/s against time and step, from ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def write_reward_plot(run_dir: Path) -> Path | None:
    """Write ``<run_dir>/reward.png``; returns its path, or None when there are no metrics."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = rows[0]["time"]
    t = [(r["time"] - t0) for r in rows]
    step = [r["step"] for r in rows]
    reward = [r.get("reward_mean", 0.0) for r in rows]
    sps = [r.get("samples_per_s", 0.0) for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharey="row")
    for col, (x, label) in enumerate(((t, "time (s)"), (step, "learner step"))):
        axes[0, col].plot(x, reward, color="tab:blue")
        axes[0, col].set_ylabel("reward mean")
        axes[1, col].plot(x, sps, color="tab:orange")
        axes[1, col].set_ylabel("samples/s")
        axes[1, col].set_xlabel(label)
    fig.suptitle(f"{Path(run_dir).name}: reward and throughput")
    fig.tight_layout()
    out = Path(run_dir) / "reward.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
