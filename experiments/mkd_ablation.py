#!/usr/bin/env python3
"""Claim 3: Moshpit knowledge distillation (MKD) more than halves the rounds to a target accuracy.

``python experiments/mkd_ablation.py [--quick] [--out DIR] [--tasks mnist,news] [--variants base,mkd,teacher,decay]
[--seeds 0-2] [--kd-rounds 20]``

Ablation, each variant adding one part (K = ``--kd-rounds``; KD runs in rounds 1..K, then plain MAR). The flags'
meaning, from config_setup.py, peer_aggregation_logic.KnowledgeDistillation and ml_tasks.kd_loss_weights /
num_teachers:

* ``base``: no flag; MAR only.
* ``mkd`` (+ MKD): ``--kd --kd-rounds K --kd-all-candidates --kd-no-blending``. In each MAR step a peer gathers
  its group-mates' models and distils from *all* of them (mean of their logits) with L = τ²·KL + CE: λ constant
  (``--kd-no-blending``: KL and CE unweighted for all K rounds).
* ``teacher`` (+ teacher selection): ``--kd --kd-rounds K --kd-no-blending``; only the
  ℓ = max(1, ⌊0.4·candidates⌋) group-mates with the lowest KL to the student teach.
* ``decay`` (+ progressive λ decay, the full method): ``--kd --kd-rounds K``;
  L = λ·τ²·KL + (1 − λ)·CE with λ = max(0, 1 − (t − 1)/K).

Every run tests every round (``--tf 1``) and stops once the highest target is reached (``--target-acc``); rounds
(and seconds) to each target come from ``summary.json``'s ``accuracy_targets`` when the launcher writes it
(``--accuracy-targets``, passed when this checkout knows it), else from the ``test_accuracy`` of the metrics rows.

Sizes: full N = 16 (gs 4, gk = ni = 2), ``--iv 4``, K = 20, seeds 0–2, MNIST (targets 50, 90 %, at most 60 rounds)
and 20 Newsgroups (``--ml news --bs 64 --lr 0.1``, targets 50, 60 %, at most 100 rounds); ``--quick`` MNIST only,
N = 4 (gs 4, gk = ni = 1), ``--iv 4``, K = 2, at most 4 rounds, seed 0. Writes ``table.md``, ``results.json``,
``rounds_to_target.{png,svg}`` and ``plots/<task>/`` (per-run curves); the news runs share one embedding cache in
``OUT/news_cache``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: the repository root on sys.path, for `experiments.common`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

VARIANTS = ("base", "mkd", "teacher", "decay")
LABELS = {"base": "base (MAR)", "mkd": "+ MKD (all teachers, constant λ)", "teacher": "+ teacher selection",
          "decay": "+ progressive λ decay"}
TASKS = {  # flags and default targets (percent) per task
    "mnist": {"flags": (), "targets": [50.0, 90.0], "rounds": 60},
    "news": {"flags": ("--ml", "news", "--bs", "64", "--lr", "0.1"), "targets": [50.0, 60.0], "rounds": 100},
}
QUICK = {"np": 4, "iv": 4, "kd_rounds": 2, "tasks": ["mnist"], "seeds": [0], "rounds": 4}
FULL = {"np": 16, "iv": 4, "kd_rounds": 20, "tasks": ["mnist", "news"], "seeds": [0, 1, 2], "rounds": None}
CLAIM_SPEEDUP = 2.0  # "more than half": base rounds / MKD rounds > 2


def variant_flags(variant: str, kd_rounds: int) -> List[str]:
    kd = ["--kd", "--kd-rounds", str(kd_rounds)]
    return {"base": [], "mkd": kd + ["--kd-all-candidates", "--kd-no-blending"], "teacher": kd + ["--kd-no-blending"],
            "decay": kd}[variant]


def build_specs(*, tasks: Sequence[str], variants: Sequence[str], seeds: Sequence[int], num_peers: int,
                iteration_value: int, kd_rounds: int, rounds: Optional[int], targets: Dict[str, List[float]],
                record_targets: bool, news_cache: str) -> List[common.RunSpec]:
    """One run per (task, variant, seed), tested every round, stopping at the task's highest target.

    :param record_targets: pass ``--accuracy-targets`` (the launcher records rounds/seconds to each target)
    :param news_cache: ``--news-cache-dir`` of the news runs: all of them share one embedding cache (a read-only
        data dir would otherwise make every run embed the corpus again, ~7 min on 2 cores)
    """
    specs = []
    for task in tasks:
        task_targets = targets[task]
        for variant in variants:
            for seed in seeds:
                flags = [*TASKS[task]["flags"], *common.layout_flags(num_peers), "--iv", str(iteration_value),
                         "--rounds", str(rounds or TASKS[task]["rounds"]), "--tf", "1",
                         "--target-acc", f"{max(task_targets):g}", "-sd", str(seed),
                         *variant_flags(variant, kd_rounds)]
                flags += ["--news-cache-dir", news_cache] if task == "news" else []
                if record_targets:
                    flags += ["--accuracy-targets", ",".join(f"{t:g}" for t in task_targets)]
                specs.append(common.RunSpec(name=f"{task}-{variant}-s{seed}", flags=tuple(flags),
                                            labels={"task": task, "variant": variant, "seed": seed}))
    return specs


def table_rows(results: Sequence[common.RunResult], targets: Dict[str, List[float]]) -> List[Dict[str, Any]]:
    """Per (task, variant): rounds and seconds to each target per seed (None: not reached or failed), means,
    and the speed-up in rounds against the same task's base variant."""
    rows: List[Dict[str, Any]] = []
    for (task, variant), group in common.group_by(results, "task", "variant").items():
        row: Dict[str, Any] = {"task": task, "variant": variant, "runs": len(group), "status": common.statuses(group),
                               "final_accuracy": [r.summary.get("final_test_accuracy") if r.ok else None
                                                  for r in group], "targets": {}}
        for target in targets[task]:
            hits = [common.target_hit(r.summary, r.rows, target) if r.ok else (None, None) for r in group]
            row["targets"][f"{target:g}"] = {"rounds": [h[0] for h in hits], "seconds": [h[1] for h in hits],
                                             "rounds_mean": common.mean_std([h[0] for h in hits])[0]}
        rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["task"] == row["task"] and r["variant"] == "base"), None)
        for key, figures in row["targets"].items():
            base_mean = base["targets"][key]["rounds_mean"] if base else None
            mean = figures["rounds_mean"]
            figures["speedup_vs_base"] = base_mean / mean if base_mean and mean else None
    return rows


def markdown(rows: Sequence[Dict[str, Any]], task: str, targets: Sequence[float]) -> str:
    head = ["variant", "runs"]
    head += [f"rounds to {t:g} %" for t in targets] + [f"seconds to {t:g} %" for t in targets]
    head += [f"base / variant rounds to {t:g} %" for t in targets] + ["final acc %", "status"]
    body = []
    for r in (r for r in rows if r["task"] == task):
        figures = [r["targets"][f"{t:g}"] for t in targets]
        body.append([LABELS[r["variant"]], r["runs"]]
                    + [common.pm(f["rounds"], ".1f", of=r["runs"]) for f in figures]
                    + [common.pm(f["seconds"], ".0f", of=r["runs"]) for f in figures]
                    + ["—" if f["speedup_vs_base"] is None else f"{f['speedup_vs_base']:.2f}×" for f in figures]
                    + [common.pm(r["final_accuracy"], of=r["runs"]), r["status"]])
    return common.markdown_table(head, body)


def claim_notes(rows: Sequence[Dict[str, Any]], targets: Dict[str, List[float]]) -> List[str]:
    notes = []
    for r in rows:
        if r["variant"] != "decay":
            continue
        for target in targets[r["task"]]:
            speedup = r["targets"][f"{target:g}"]["speedup_vs_base"]
            if speedup is not None:
                verdict = "holds" if speedup > CLAIM_SPEEDUP else "does NOT hold"
                notes.append(f"{r['task']}, {target:g} %: full MKD needs {1 / speedup:.2f}× the base's rounds "
                             f"(claim: less than 1/{CLAIM_SPEEDUP:g}: {verdict} here).")
    return notes


def plot_summary(rows: Sequence[Dict[str, Any]], targets: Dict[str, List[float]], out: str) -> List[str]:
    """Per task a panel of bars: rounds to each target per variant (mean ± std over the seeds that reached it)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = common.new_figure(6.0 * max(1, len(tasks)), 4.5)
    for index, task in enumerate(tasks, 1):
        ax = fig.add_subplot(1, len(tasks), index)
        task_rows = [r for r in rows if r["task"] == task]
        width = 0.8 / len(targets[task])
        for offset, target in enumerate(targets[task]):
            stats = [common.mean_std(r["targets"][f"{target:g}"]["rounds"]) for r in task_rows]
            xs = [i + (offset - (len(targets[task]) - 1) / 2) * width for i in range(len(task_rows))]
            ax.bar(xs, [m or 0 for m, _, _ in stats], width, yerr=[s or 0 for _, s, _ in stats], capsize=3,
                   label=f"to {target:g} %")
            for x, (mean, _, n), r in zip(xs, stats, task_rows):
                if n < r["runs"]:
                    ax.annotate(f"{n}/{r['runs']}", (x, mean or 0), ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(range(len(task_rows)), [LABELS[r["variant"]] for r in task_rows], rotation=15,
                      ha="right", fontsize="small")
        ax.set_ylabel("rounds")
        ax.set_title(f"{task}: rounds to target (k/n: seeds that reached it)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    return common.save_figure(fig, out, "rounds_to_target")


def build_parser():
    p = common.base_parser("experiments/mkd_ablation.py", __doc__.splitlines()[0], seeds="quick 0; full 0-2")
    p.add_argument("--tasks", type=common.list_arg(str, TASKS), default=None,
                   help="tasks (default: quick mnist; full mnist,news)")
    p.add_argument("--variants", type=common.list_arg(str, VARIANTS), default=list(VARIANTS),
                   help=f"variants, from {', '.join(VARIANTS)}")
    p.add_argument("--targets", type=common.list_arg(float), default=None,
                   help="target accuracies in percent for every task (default: mnist 50,90; news 50,60)")
    p.add_argument("--kd-rounds", type=int, default=None, help="K (default: quick 2; full 20)")
    p.add_argument("--np", type=int, default=None, help="peers (default: quick 4; full 16)")
    p.add_argument("--rounds", type=int, default=None, help="most rounds per run (default: quick 4; full mnist 60, "
                                                            "news 100)")
    return p


def run(args) -> int:
    size = QUICK if args.quick else FULL
    out = common.out_dir(args, "mkd_ablation")
    tasks = args.tasks or size["tasks"]
    targets = {task: sorted(args.targets or TASKS[task]["targets"]) for task in tasks}
    specs = build_specs(tasks=tasks, variants=args.variants, seeds=args.seeds or size["seeds"],
                        num_peers=args.np or size["np"], iteration_value=size["iv"],
                        kd_rounds=args.kd_rounds or size["kd_rounds"], rounds=args.rounds or size["rounds"],
                        targets=targets, record_targets=common.supports_flag("--accuracy-targets"),
                        news_cache=os.path.abspath(os.path.join(out, "news_cache")))
    results = common.run_all(specs, out=out, data_dir=args.data_dir)
    rows = table_rows(results, targets)
    tables = [(task, markdown(rows, task, targets[task])) for task in tasks]
    notes = [f"K = {args.kd_rounds or size['kd_rounds']} KD rounds; every round tested; a run stops at its task's "
             "highest target. Rounds/seconds: mean ± sample std over the seeds that reached the target, `(k/n)` when "
             "only k of n did; seconds are the launcher's `elapsed_seconds` (KD rounds cost more, on CPU ~4×).",
             "base / variant: the base's mean rounds to the target divided by the variant's (> 1: fewer rounds).",
             *claim_notes(rows, targets)]
    notes += [common.QUICK_NOTE] if args.quick else []
    text = common.write_outputs(out, title="Rounds to target accuracy: MKD ablation (claim 3)", tables=tables,
                                notes=notes, results={"experiment": "mkd_ablation", "quick": args.quick,
                                                      "targets": targets, "rows": rows,
                                                      "runs": common.run_records(results)})
    plot_summary(rows, targets, out)
    for (task,), group in common.group_by(results, "task").items():
        common.plot_runs([r.run_dir for r in group], os.path.join(out, "plots", task), target=max(targets[task]))
    print(text)
    print(f"table.md, results.json, rounds_to_target.png/svg and plots/ written to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.main_guard(lambda: run(args), "experiments/mkd_ablation.py")


if __name__ == "__main__":
    sys.exit(main())
