#!/usr/bin/env python3
"""Claim 4: DP-MAR-FL follows centralised DP-FedAvg's privacy–utility curve.

``python experiments/privacy_utility.py [--quick] [--out DIR] [--methods mar,fedavg] [--noise 0.5,0.75,1,1.5]
[--seeds 0]``

For each method and noise multiplier z, an MNIST run with ``--dp --nm z`` (DP-MAR-FL) or ``--dp --nm z
--aggregation fedavg`` (DP-FedAvg, centralised); adaptive clipping from ``--ct 0.1``. The table gives final and
best test accuracy and ε after the last round (``dp_epsilon`` of the last metrics row: the central observer's ε,
and ``dp_epsilon_groupmate``), mean ± std over seeds; the figure plots accuracy against the central ε, one curve
per method (labelled with z). Runs are read with ``scripts/dp_curve.py``'s ``load_run``.

Sizes: full N = 16 (gs 4, gk = ni = 2), ``--iv 4``, 100 rounds, tested every 5, z = 0.5, 0.75, 1.0, 1.5, seed 0;
``--quick`` N = 4 (gs 4, gk = ni = 1), ``--iv 2``, 3 rounds, z = 0.2, 0.35 (at N = 4 the clip-indicator noise
σ_b = N/20 only admits z < 2σ_b = 0.4), seed 0. Writes ``table.md``, ``results.json``,
``accuracy_vs_epsilon.{png,svg}`` and ``plots/`` (per-run curves).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: the repository root on sys.path, for `experiments.common`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

METHODS = {"mar": (), "fedavg": ("--aggregation", "fedavg")}
LABELS = {"mar": "DP-MAR-FL", "fedavg": "DP-FedAvg (central)"}
QUICK = {"np": 4, "rounds": 3, "iv": 2, "tf": 3, "noise": [0.2, 0.35], "seeds": [0]}
FULL = {"np": 16, "rounds": 100, "iv": 4, "tf": 5, "noise": [0.5, 0.75, 1.0, 1.5], "seeds": [0]}


def build_specs(*, methods: Sequence[str], noise: Sequence[float], seeds: Sequence[int], num_peers: int,
                rounds: int, iteration_value: int, test_every: int) -> List[common.RunSpec]:
    specs = []
    for method in methods:
        for z in noise:
            for seed in seeds:
                flags = [*common.layout_flags(num_peers), "--rounds", str(rounds), "--iv", str(iteration_value),
                         "--tf", str(test_every), "--dp", "--nm", f"{z:g}", "-sd", str(seed), *METHODS[method]]
                specs.append(common.RunSpec(name=f"{method}-z{z:g}-s{seed}", flags=tuple(flags),
                                            labels={"method": method, "z": z, "seed": seed}))
    return specs


def read_dp(result: common.RunResult) -> Optional[Any]:
    """The run as ``dp_curve.DpRun`` (final/best accuracy, ε central and group-mate at its last round); None
    when it has no DP rows (failed before its first round)."""
    import dp_curve  # scripts/dp_curve.py (experiments.common puts scripts/ on sys.path)

    try:
        return dp_curve.load_run(result.run_dir)
    except (OSError, ValueError, KeyError):
        return None


def table_rows(results: Sequence[common.RunResult]) -> List[Dict[str, Any]]:
    rows = []
    for (method, z), group in common.group_by(results, "method", "z").items():
        runs = [read_dp(r) if r.ok else None for r in group]
        value = lambda name: [getattr(d, name) if d else None for d in runs]  # noqa: E731
        rows.append({"method": method, "z": z, "runs": len(group), "status": common.statuses(group),
                     "rounds": [d.rounds if d else None for d in runs], "final_accuracy": value("final_accuracy"),
                     "best_accuracy": value("best_accuracy"), "epsilon": value("epsilon"),
                     "epsilon_groupmate": value("epsilon_groupmate"),
                     "noise": sorted({d.noise for d in runs if d and d.noise})})
    return rows


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    head = ["method", "z", "runs", "rounds", "final acc %", "best acc %", "ε central", "ε group-mate", "noise",
            "status"]
    return common.markdown_table(head, [
        [LABELS[r["method"]], f"{r['z']:g}", r["runs"], common.pm(r["rounds"], ".0f", of=r["runs"]),
         common.pm(r["final_accuracy"], of=r["runs"]), common.pm(r["best_accuracy"], of=r["runs"]),
         common.pm(r["epsilon"], ".1f", of=r["runs"]), common.pm(r["epsilon_groupmate"], ",.0f", of=r["runs"]),
         ", ".join(r["noise"]) or "—", r["status"]] for r in rows])


def plot_summary(rows: Sequence[Dict[str, Any]], out: str) -> List[str]:
    """Final accuracy against the central ε (log x), one curve per method, points labelled with z."""
    fig = common.new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = []
        for r in rows:
            eps, acc = common.mean_std(r["epsilon"]), common.mean_std(r["final_accuracy"])
            if r["method"] == method and eps[0] is not None and acc[0] is not None:
                points.append((eps[0], acc[0], acc[1], r["z"]))
        if not points:
            continue
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=LABELS[method])
        for eps, acc, _, z in points:
            ax.annotate(f"z={z:g}", (eps, acc), textcoords="offset points", xytext=(4, -12), fontsize="x-small")
    ax.set_xscale("log")
    ax.set_xlabel("ε after the last round (central observer, δ = N^-1.1)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("privacy–utility: final accuracy against ε (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    return common.save_figure(fig, out, "accuracy_vs_epsilon")


def build_parser():
    p = common.base_parser("experiments/privacy_utility.py", __doc__.splitlines()[0], seeds="0")
    p.add_argument("--methods", type=common.list_arg(str, METHODS), default=list(METHODS),
                   help=f"methods, from {', '.join(METHODS)}")
    p.add_argument("--noise", type=common.list_arg(float), default=None,
                   help="noise multipliers z (default: quick 0.2,0.35; full 0.5,0.75,1,1.5)")
    p.add_argument("--np", type=int, default=None, help="peers (default: quick 4; full 16)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default: quick 3; full 100)")
    return p


def run(args) -> int:
    size = QUICK if args.quick else FULL
    out = common.out_dir(args, "privacy_utility")
    specs = build_specs(methods=args.methods, noise=args.noise or size["noise"], seeds=args.seeds or size["seeds"],
                        num_peers=args.np or size["np"], rounds=args.rounds or size["rounds"],
                        iteration_value=size["iv"], test_every=size["tf"])
    results = common.run_all(specs, out=out, data_dir=args.data_dir)
    rows = table_rows(results)
    notes = ["ε: `dp_epsilon` (central observer, zero-out adjacency) and `dp_epsilon_groupmate` of the last metrics "
             "row, as the README's DP section defines them; accuracy: `final_test_accuracy` / `best_test_accuracy`.",
             "Mean ± sample std over seeds; `(k/n)` when only k of n seeds completed (a diverged run is counted "
             "in the status, not in the means). DP noise comes from OS entropy: runs are not bit-reproducible."]
    notes += [common.QUICK_NOTE] if args.quick else []
    text = common.write_outputs(out, title="Privacy–utility: DP-MAR-FL and DP-FedAvg (claim 4)",
                                tables=[("", markdown(rows))], notes=notes,
                                results={"experiment": "privacy_utility", "quick": args.quick, "rows": rows,
                                         "runs": common.run_records(results)})
    plot_summary(rows, out)
    common.plot_runs([r.run_dir for r in results], os.path.join(out, "plots"))
    print(text)
    print(f"table.md, results.json, accuracy_vs_epsilon.png/svg and plots/ written to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.main_guard(lambda: run(args), "experiments/privacy_utility.py")


if __name__ == "__main__":
    sys.exit(main())
