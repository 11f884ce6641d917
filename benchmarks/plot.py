"""Render a benchmark JSON file as a PNG bar chart (time per case/pass, one bar per provider)."""
from __future__ import annotations

import json
import os
import sys


def plot_results(json_path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        payload = json.load(f)
    records = [r for r in payload["results"] if r.get("ms") is not None]
    groups = sorted({(r["case"], r["mode"]) for r in records}, key=lambda g: (g[0], g[1]))
    providers = sorted({r["provider"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(groups) + 4), 5), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, key, label in ((axes[0][0], "ms", "median time (ms), lower is better"),
                           (axes[0][1], "peak_mb", "peak extra memory (MB), lower is better")):
        for p_i, provider in enumerate(providers):
            values = []
            for case, mode in groups:
                match = [r.get(key) for r in records if r["provider"] == provider and r["case"] == case and r["mode"] == mode]
                values.append(match[0] if match and match[0] is not None else 0.0)
            xs = [g + p_i * width for g in range(len(groups))]
            ax.bar(xs, values, width=width, label=provider)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    env = payload.get("environment", {})
    fig.suptitle(f"{payload['benchmark']} on {env.get('device')} (torch {env.get('torch')}, triton {env.get('triton')})", fontsize=10)
    fig.tight_layout()
    png = os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(plot_results(path))
