#!/usr/bin/env python3
"""Privacy–utility curve from finished ``--dp`` run dirs: test accuracy against ε, one point per run (per z).

``python scripts/dp_curve.py RUN_DIR [RUN_DIR ...] --out bench/dp_curve.png`` reads each run's ``config.json``,
``summary.json`` and ``metrics.jsonl``, prints one table row per run (z, rounds, final and best accuracy, ε central
and group-mate at the last round, the noise source) and plots final (and best) accuracy against the central ε,
labelled by z, with the group-mate ε on a second panel. A run with seeded (not private) noise is marked as such.
``--at-round R`` reads every run at round R instead (accuracy of the last tested round ≤ R, best up to R, ε at R),
so runs of different lengths compare at the same privacy horizon.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class DpRun:
    run_dir: str
    noise_multiplier: float
    rounds: int
    status: str
    final_accuracy: Optional[float]
    best_accuracy: Optional[float]
    epsilon: Optional[float]
    epsilon_groupmate: Optional[float]
    noise: Optional[str]


def _read_jsonl(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(run_dir: str, at_round: Optional[int] = None) -> DpRun:
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    rows = [r for r in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "dp_epsilon" in r]
    if not config.get("dp") or not rows:
        raise ValueError(f"{run_dir}: not a finished --dp run")
    noise = summary.get("dp_noise", rows[-1].get("dp_noise"))
    if at_round is None:
        last = rows[-1]
        return DpRun(run_dir=run_dir, noise_multiplier=config["noise_multiplier"], rounds=summary["rounds"],
                     status=summary["status"], final_accuracy=summary["final_test_accuracy"],
                     best_accuracy=summary["best_test_accuracy"], epsilon=last["dp_epsilon"],
                     epsilon_groupmate=last["dp_epsilon_groupmate"], noise=noise)
    upto = [r for r in rows if r["round"] <= at_round]
    if not upto or upto[-1]["round"] != at_round:
        raise ValueError(f"{run_dir}: has no round {at_round}")
    tested = [r["test_accuracy"] for r in upto if r.get("test_accuracy") is not None]
    return DpRun(run_dir=run_dir, noise_multiplier=config["noise_multiplier"], rounds=at_round,
                 status=f"at round {at_round}", final_accuracy=tested[-1] if tested else None,
                 best_accuracy=max(tested, default=None), epsilon=upto[-1]["dp_epsilon"],
                 epsilon_groupmate=upto[-1]["dp_epsilon_groupmate"], noise=noise)


def table(runs: Sequence[DpRun]) -> str:
    head = ("| z | rounds | status | final acc % | best acc % | ε central | ε group-mate | noise |\n"
            "|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    return "\n".join([head] + [
        f"| {r.noise_multiplier:g} | {r.rounds} | {r.status} | {fmt(r.final_accuracy, '.2f')} | "
        f"{fmt(r.best_accuracy, '.2f')} | {fmt(r.epsilon, '.1f')} | {fmt(r.epsilon_groupmate, ',.0f')} | {r.noise} |"
        for r in runs])


def plot(runs: Sequence[DpRun], out: str, at_round: Optional[int] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "epsilon", "central observer (zero-out)"),
                           (axes[1], "epsilon_groupmate", "group-mate (replace-one)")):
        points = [r for r in runs if getattr(r, key) is not None and r.final_accuracy is not None]
        xs = [getattr(r, key) for r in points]
        last = "final accuracy" if at_round is None else f"accuracy at round {at_round}"
        ax.plot(xs, [r.final_accuracy for r in points], "o-", label=last)
        ax.plot(xs, [r.best_accuracy for r in points], "x--", label="best accuracy" + ("" if at_round is None else
                                                                                      " up to it"))
        for r, x in zip(points, xs):
            ax.annotate(f"z={r.noise_multiplier:g}" + ("" if r.noise == "os-entropy" else " (NOT PRIVATE)"),
                        (x, r.final_accuracy), textcoords="offset points", xytext=(5, -12))
        ax.set_xscale("log")
        when = "after the last round" if at_round is None else f"at round {at_round}"
        ax.set_xlabel(f"ε {when} ({title})")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    fig.suptitle("MAR-FL --dp: test accuracy against ε over the noise multiplier z")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="bench/dp_curve.png")
    p.add_argument("--at-round", type=int, default=None, help="read every run at this round (default: its end)")
    args = p.parse_args(argv)
    runs = sorted((load_run(d, args.at_round) for d in args.run_dirs), key=lambda r: r.noise_multiplier)
    print(table(runs))
    plot(runs, args.out, args.at_round)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
