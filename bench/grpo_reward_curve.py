"""The reward curve of a glm-train objective=grpo run (README's bench/figures/grpo_tiny_reward.png):

    glm-train --config grpo_tiny output_dir=runs/grpo_tiny
    python bench/grpo_reward_curve.py runs/grpo_tiny bench/figures/grpo_tiny_reward.png

Reads RUN/rollouts.jsonl (one line a step: its completions and their rewards)."""

import json
import pathlib
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(run: str, png: str, title: str = "grpo_tiny", k: int = 10) -> None:
    lines = (pathlib.Path(run) / "rollouts.jsonl").read_text().splitlines()
    r = np.array([np.mean([v for v in json.loads(x)["rewards"] if v is not None]) for x in lines if x.strip()])
    s = np.arange(1, len(r) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(s, r, alpha=0.35, label="mean reward of the step's completions")
    ax.plot(s[k - 1 :], np.convolve(r, np.ones(k) / k, mode="valid"), label=f"{k}-step moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"glm-train objective=grpo: {title}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print("reward by 20-step window:", [round(float(r[i : i + 20].mean()), 3) for i in range(0, len(r), 20)])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
