#!/usr/bin/env python3
"""Claim 2: MAR-FL loses less than 5 % accuracy at 50 % participation.

``python experiments/participation.py [--quick] [--out DIR] [--methods mar-packed,mar-reference,fedavg]
[--participation 100,75,50,25] [--seeds 0-2]``

For each method and participation P, MNIST runs with ``--up P --ap P`` (the same P % of the peers train and
aggregate each round, drawn from (seed, round)); the table gives the final test accuracy (mean ± std over seeds),
its drop from the same method at 100 % in percentage points and relative to it (the claim: relative drop < 5 %
at 50 %). Methods: ``mar-packed`` (``--grouping packed``), ``mar-reference`` (``--grouping reference``),
``fedavg`` (``--aggregation fedavg``), and ``mar`` (no extra flag: this checkout's default MAR).

Sizes: full N = 16 (gs 4, gk = ni = 2), ``--iv 4``, 50 rounds, tested every 5, seeds 0–2; ``--quick`` N = 4
(gs 4, gk = ni = 1), ``--iv 2``, 3 rounds, participation 100 and 50, seed 0. Writes ``table.md``, ``results.json``,
``accuracy_vs_participation.{png,svg}`` and ``plots/<method>/`` (per-run curves, seeds as bands).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: the repository root on sys.path, for `experiments.common`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

METHODS = {
    "mar-packed": ("--grouping", "packed"),
    "mar-reference": ("--grouping", "reference"),
    "fedavg": ("--aggregation", "fedavg"),
    "mar": (),
}
DEFAULT_METHODS = ["mar-packed", "mar-reference", "fedavg"]
QUICK = {"np": 4, "rounds": 3, "iv": 2, "tf": 3, "participation": [100.0, 50.0], "seeds": [0]}
FULL = {"np": 16, "rounds": 50, "iv": 4, "tf": 5, "participation": [100.0, 75.0, 50.0, 25.0], "seeds": [0, 1, 2]}
CLAIM_PARTICIPATION, CLAIM_DROP = 50.0, 5.0  # percent participation, max relative accuracy loss in percent


def build_specs(*, methods: Sequence[str], participation: Sequence[float], seeds: Sequence[int], num_peers: int,
                rounds: int, iteration_value: int, test_every: int) -> List[common.RunSpec]:
    specs = []
    for method in methods:
        for percent in participation:
            for seed in seeds:
                flags = [*common.layout_flags(num_peers), "--rounds", str(rounds), "--iv", str(iteration_value),
                         "--tf", str(test_every), "--up", f"{percent:g}", "--ap", f"{percent:g}", "-sd", str(seed),
                         *METHODS[method]]
                specs.append(common.RunSpec(name=f"{method}-p{percent:g}-s{seed}", flags=tuple(flags),
                                            labels={"method": method, "participation": percent, "seed": seed}))
    return specs


def table_rows(results: Sequence[common.RunResult]) -> List[Dict[str, Any]]:
    """Per (method, participation): final and best accuracy over seeds, and the drop from the same method's
    100 % (mean final accuracy) in points and relative to it."""
    groups = common.group_by(results, "method", "participation")
    full = {method: common.mean_std([r.summary.get("final_test_accuracy") for r in group if r.ok])[0]
            for (method, percent), group in groups.items() if percent == 100}
    rows = []
    for (method, percent), group in groups.items():
        final = [r.summary.get("final_test_accuracy") if r.ok else None for r in group]
        mean, std, count = common.mean_std(final)
        reference = full.get(method)
        drop = None if mean is None or reference is None else reference - mean
        rows.append({"method": method, "participation": percent, "runs": len(group), "completed": count,
                     "final_accuracy": mean, "final_accuracy_std": std,
                     "best_accuracy": common.mean_std([r.summary.get("best_test_accuracy") for r in group if r.ok])[0],
                     "drop_points": drop, "drop_relative_percent": None if drop is None else 100 * drop / reference,
                     "final_accuracies": final, "status": common.statuses(group)})
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    head = ["method", "participation %", "runs", "final acc %", "best acc %", "drop vs 100 % (points)",
            "relative drop %", "status"]
    fmt = lambda v, spec=".2f": "—" if v is None else format(v, spec)  # noqa: E731
    return common.markdown_table(head, [
        [r["method"], f"{r['participation']:g}", r["runs"], common.pm(r["final_accuracies"], of=r["runs"]),
         fmt(r["best_accuracy"]), fmt(r["drop_points"], "+.2f"), fmt(r["drop_relative_percent"], "+.2f"), r["status"]]
        for r in rows])


def claim_notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    notes = []
    for r in rows:
        if r["participation"] == CLAIM_PARTICIPATION and r["drop_relative_percent"] is not None:
            verdict = "holds" if r["drop_relative_percent"] < CLAIM_DROP else "does NOT hold"
            notes.append(f"{r['method']}: {r['participation']:g} % participation loses "
                         f"{r['drop_relative_percent']:.2f} % of the 100 % accuracy (claim < {CLAIM_DROP:g} %: "
                         f"{verdict} here).")
    return notes


def plot_summary(rows: Sequence[Dict[str, Any]], out: str) -> List[str]:
    fig = common.new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["participation"], r["final_accuracy"], r["final_accuracy_std"]) for r in rows
                        if r["method"] == method and r["final_accuracy"] is not None)
        if points:
            xs, ys, errors = zip(*points)
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
    ax.set_xlabel("participation (% of peers training and aggregating per round)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("final accuracy against participation (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    return common.save_figure(fig, out, "accuracy_vs_participation")


def build_parser():
    p = common.base_parser("experiments/participation.py", __doc__.splitlines()[0], seeds="quick 0; full 0-2")
    p.add_argument("--methods", type=common.list_arg(str, METHODS), default=DEFAULT_METHODS,
                   help=f"methods, from {', '.join(METHODS)}")
    p.add_argument("--participation", type=common.list_arg(float), default=None,
                   help="percent of peers per round (default: quick 100,50; full 100,75,50,25)")
    p.add_argument("--np", type=int, default=None, help="peers (default: quick 4; full 16)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default: quick 3; full 50)")
    return p


def run(args) -> int:
    size = QUICK if args.quick else FULL
    out = common.out_dir(args, "participation")
    specs = build_specs(methods=args.methods, participation=args.participation or size["participation"],
                        seeds=args.seeds or size["seeds"], num_peers=args.np or size["np"],
                        rounds=args.rounds or size["rounds"], iteration_value=size["iv"], test_every=size["tf"])
    results = common.run_all(specs, out=out, data_dir=args.data_dir)
    rows = table_rows(results)
    notes = ["Final accuracy: `final_test_accuracy` of `summary.json` (the last tested round: the run's last), "
             "mean ± sample std over seeds; `(k/n)` when only k of n seeds completed.",
             "The drop is against the same method at 100 % participation (mean over its seeds); relative drop = "
             "drop / accuracy at 100 %.", *claim_notes(rows)]
    notes += [common.QUICK_NOTE] if args.quick else []
    text = common.write_outputs(out, title="Accuracy against participation (claim 2)", tables=[("", markdown(rows))],
                                notes=notes, results={"experiment": "participation", "quick": args.quick,
                                                      "rows": rows, "runs": common.run_records(results)})
    plot_summary(rows, out)
    for method, group in common.group_by(results, "method").items():
        common.plot_runs([r.run_dir for r in group], os.path.join(out, "plots", method[0]))
    print(text)
    print(f"table.md, results.json, accuracy_vs_participation.png/svg and plots/ written to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.main_guard(lambda: run(args), "experiments/participation.py")


if __name__ == "__main__":
    sys.exit(main())
