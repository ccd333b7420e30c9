#!/usr/bin/env python3
"""Plots and tables from finished MAR-FL run dirs.

``python mar_fl.py plot RUN_DIR [RUN_DIR ...] --out DIR`` (or ``python scripts/plots.py ...``) reads each run's
``config.json``, ``summary.json`` and ``metrics.jsonl``. Runs whose configs differ only in the seed (and in keys
that do not change what is computed: paths, wandb, hosts, checkpointing) are one configuration: its seeds become a
mean ± std band. Each configuration is one line, labelled by the flags that differ between configurations. The
same command prints a Markdown table (mean ± std over seeds of final / best test accuracy, rounds and seconds to a
target accuracy, median seconds per round, MB sent per peer per round) and writes it as ``table.csv`` and
``table.md`` in ``--out``.

The launcher calls :func:`write_run_plots` when a run ends (``RUN_DIR/plots/``). Only the launcher and this
command import matplotlib (lazily, Agg canvas, no pyplot state); peers never do.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("mar_fl.plots")

# config keys that do not change what a run computes: runs differing only in these are seeds of one configuration
IGNORED_KEYS = frozenset({
    "seed", "run_dir", "data_dir", "initial_peers", "peer_range", "host", "announce_host", "nat_port_map",
    "startup_timeout", "ckpt_every", "resume", "shm_warn_percent", "news_cache_dir", "max_runtime_hours",
    "max_failed_percent", "log_level", "accuracy_targets"})
IGNORED_PREFIXES = ("wandb",)  # wandb_mode, wandb_project, wandb_entity, wandb_group, ...
FORMATS = ("png", "svg")
MB = 1e6


class RunError(ValueError):
    """A run dir that cannot be plotted (missing, or no metrics rows): reported and skipped."""


@dataclass
class Run:
    """One run dir: its config, summary (may be empty) and metrics rows (sorted by round, one per round)."""

    run_dir: str
    config: Dict[str, Any]
    summary: Dict[str, Any]
    rows: List[Dict[str, Any]]

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass
class Group:
    """Runs of one configuration (they differ only in ignored keys such as the seed)."""

    config: Dict[str, Any]
    runs: List[Run] = field(default_factory=list)


# ==================== reading ====================


def read_rows(path: str) -> List[Dict[str, Any]]:
    """The metrics rows of a jsonl file, sorted by round (the last row of a round wins). Damaged lines, lines
    that are no JSON object with a positive integer ``round``, and an unfinished last line are skipped."""
    by_round: Dict[int, Dict[str, Any]] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            logger.warning("skipping a damaged line in %s (line %d)", path, number)
            continue
        if isinstance(row, dict) and type(row.get("round")) is int and row["round"] >= 1:
            by_round[row["round"]] = row
        else:
            logger.warning("skipping a line without a round in %s (line %d)", path, number)
    return [by_round[r] for r in sorted(by_round)]


def _read_json(path: str) -> Dict[str, Any]:
    """A JSON object from ``path``; {} when it is missing or damaged (the caller decides whether that matters)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def load_run(run_dir: str) -> Run:
    """Read one run dir. RunError when it is no folder or has no metrics rows."""
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: no such run dir")
    rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise RunError(f"{run_dir}: no metrics rows (metrics.jsonl missing or empty)")
    config = _read_json(os.path.join(run_dir, "config.json"))
    if not config:
        logger.warning("%s: config.json missing or damaged: the run is its own configuration", run_dir)
        config = {"run_dir": run_dir, "_unknown_config": os.path.abspath(run_dir)}
    return Run(run_dir=run_dir, config=config, summary=_read_json(os.path.join(run_dir, "summary.json")),
               rows=rows)


def load_runs(run_dirs: Sequence[str]) -> List[Run]:
    """Every readable run of ``run_dirs``; each one that cannot be read is reported on stderr and skipped."""
    runs, seen = [], set()
    for run_dir in run_dirs:
        if os.path.realpath(run_dir) in seen:
            continue  # the same run twice is one run, not two seeds
        seen.add(os.path.realpath(run_dir))
        try:
            runs.append(load_run(run_dir))
        except RunError as e:
            print(f"skipping {e}", file=sys.stderr)
    return runs


# ==================== grouping and labels ====================


def is_ignored(key: str) -> bool:
    """True for config keys that do not make a different configuration (seed, paths, wandb, hosts...)."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def config_key(config: Dict[str, Any]) -> str:
    """A hashable identity of a configuration: its config without the ignored keys."""
    return json.dumps({k: v for k, v in config.items() if not is_ignored(k)}, sort_keys=True, default=str)


def group_runs(runs: Sequence[Run]) -> List[Group]:
    """Runs grouped by configuration, groups in order of first appearance, runs in a group sorted by seed."""
    groups: Dict[str, Group] = {}
    for run in runs:
        groups.setdefault(config_key(run.config), Group(config=run.config)).runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (str(type(r.seed)), r.seed if r.seed is not None else 0))
    return list(groups.values())


def differing_keys(groups: Sequence[Group]) -> List[str]:
    """Config keys (not ignored) whose value differs between groups, in config order."""
    keys: List[str] = []
    for group in groups:
        keys += [k for k in group.config if k not in keys and not is_ignored(k)]
    return [k for k in keys if len({json.dumps(g.config.get(k), sort_keys=True, default=str) for g in groups}) > 1]


def _flag_names() -> Dict[str, str]:
    """Config key → the flag that sets it (config_setup's parser); {} when config_setup cannot be imported."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from config_setup import flag_names

        return dict(flag_names())
    except Exception:  # noqa: BLE001 - labels fall back to the config key
        return {}


def flag_text(key: str, value: Any, flags: Optional[Dict[str, str]] = None) -> str:
    """How one config value reads in a legend: ``--gs 4``, ``--dp`` / ``no --dp`` for switches."""
    flag = (flags or {}).get(key, "--" + key.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if value is None:
        return f"{flag} unset"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list):
        value = "-".join(map(str, value))
    return f"{flag} {value}"


def group_labels(groups: Sequence[Group], flags: Optional[Dict[str, str]] = None) -> List[str]:
    """One legend label per group, from the flags that differ between groups. With one group: its seeds."""
    keys = differing_keys(groups)
    if not keys:
        return [_seeds_text(g) for g in groups]
    flags = _flag_names() if flags is None else flags
    return [" ".join(flag_text(k, g.config.get(k), flags) for k in keys) for g in groups]


def _seeds_text(group: Group) -> str:
    seeds = [r.seed for r in group.runs]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"


# ==================== statistics and the table ====================


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean, sample standard deviation (n−1; 0 for one value) and count of the values that are not None/NaN."""
    xs = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _tested(run: Run) -> List[Dict[str, Any]]:
    return [r for r in run.rows if r.get("test_accuracy") is not None]


def run_target(run: Run, target: Optional[float]) -> Optional[float]:
    """The target accuracy a run is measured against: ``target`` if given, else its ``--target-acc`` if set."""
    if target is not None:
        return target
    value = run.config.get("target_accuracy") or 0
    return float(value) if value > 0 else None


def run_stats(run: Run, target: Optional[float] = None) -> Dict[str, Optional[float]]:
    """Per-run figures: final / best test accuracy, round and elapsed seconds when ``target`` was first reached
    (None if never or no target), median round seconds, mean MB sent per peer per round."""
    tested = _tested(run)
    hit = next((r for r in tested if target is not None and r["test_accuracy"] >= target), None)
    sent = [r["bytes_sent_per_peer"] / MB for r in run.rows if r.get("bytes_sent_per_peer") is not None]
    seconds = [r["round_seconds"] for r in run.rows if r.get("round_seconds") is not None]
    return {
        "final_accuracy": tested[-1]["test_accuracy"] if tested else None,
        "best_accuracy": max((r["test_accuracy"] for r in tested), default=None),
        "rounds_to_target": hit["round"] if hit else None,
        "seconds_to_target": hit.get("elapsed_seconds") if hit else None,
        "median_round_seconds": statistics.median(seconds) if seconds else None,
        "mb_sent_per_peer_per_round": statistics.fmean(sent) if sent else None,
        "rounds": run.rows[-1]["round"],
    }


STAT_COLUMNS = ("final_accuracy", "best_accuracy", "rounds_to_target", "seconds_to_target", "median_round_seconds",
                "mb_sent_per_peer_per_round")


def table_rows(groups: Sequence[Group], labels: Sequence[str], target: Optional[float] = None
               ) -> List[Dict[str, Any]]:
    """One dict per configuration: label, runs, seeds, target, and ``<stat>_mean`` / ``<stat>_std`` for every
    column of :data:`STAT_COLUMNS` over its seeds, plus ``target_reached`` (how many seeds reached it)."""
    rows = []
    for group, label in zip(groups, labels):
        targets = {run_target(r, target) for r in group.runs}
        stats = [run_stats(r, run_target(r, target)) for r in group.runs]
        row: Dict[str, Any] = {"configuration": label, "runs": len(group.runs),
                               "seeds": " ".join(str(r.seed) for r in group.runs),
                               "target": next(iter(targets)) if len(targets) == 1 else None,
                               "target_reached": sum(s["rounds_to_target"] is not None for s in stats)}
        for column in STAT_COLUMNS:
            mean, std, _ = mean_std([s[column] for s in stats])
            row[f"{column}_mean"], row[f"{column}_std"] = mean, std
        rows.append(row)
    return rows


def _pm(mean: Optional[float], std: Optional[float], spec: str, n: int) -> str:
    if mean is None:
        return "—"
    return format(mean, spec) if n < 2 else f"{format(mean, spec)} ± {format(std, spec)}"


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The table as Markdown: mean ± std over seeds (sample std; no ± for a single seed)."""
    has_target = any(r["target"] is not None for r in rows)
    targets = {r["target"] for r in rows}
    to = f"{next(iter(targets)):g}%" if len(targets) == 1 and has_target else "target"
    head = ["configuration", "runs", "final acc %", "best acc %"]
    head += [f"rounds to {to}", f"seconds to {to}"] if has_target else []
    head += ["median s/round", "MB sent/peer/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["runs"]
        cells = [r["configuration"], str(n), _pm(r["final_accuracy_mean"], r["final_accuracy_std"], ".2f", n),
                 _pm(r["best_accuracy_mean"], r["best_accuracy_std"], ".2f", n)]
        if has_target:
            k = r["target_reached"]
            reached = "" if k == n else f" ({k}/{n} reached)"
            cells += [_pm(r["rounds_to_target_mean"], r["rounds_to_target_std"], ".1f", k) + reached,
                      _pm(r["seconds_to_target_mean"], r["seconds_to_target_std"], ".0f", k) + reached]
        cells += [_pm(r["median_round_seconds_mean"], r["median_round_seconds_std"], ".2f", n),
                  _pm(r["mb_sent_per_peer_per_round_mean"], r["mb_sent_per_peer_per_round_std"], ".3f", n)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    """The table as CSV: one line per configuration, every mean and std as its own column (empty when None)."""
    out = io.StringIO()
    columns = ["configuration", "runs", "seeds", "target", "target_reached"]
    columns += [f"{c}_{s}" for c in STAT_COLUMNS for s in ("mean", "std")]
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r[c] for c in columns})
    return out.getvalue()


# ==================== series and plots ====================


def series(runs: Sequence[Run], key: str, scale: float = 1.0
           ) -> Tuple[List[int], List[float], List[float], List[float]]:
    """Per round that has ``key`` in any run: rounds, mean and std of ``key`` over the runs that have it, and
    the mean elapsed seconds of those runs at that round (the x of the wall-time plots)."""
    per_round: Dict[int, List[Tuple[float, Optional[float]]]] = {}
    for run in runs:
        for row in run.rows:
            if isinstance(row.get(key), (int, float)):
                per_round.setdefault(row["round"], []).append((row[key] / scale, row.get("elapsed_seconds")))
    rounds, means, stds, times = [], [], [], []
    for round_index in sorted(per_round):
        values = per_round[round_index]
        mean, std, _ = mean_std([v for v, _ in values])
        elapsed, _, n = mean_std([t for _, t in values])
        rounds.append(round_index)
        means.append(mean)
        stds.append(std)
        times.append(elapsed if n else math.nan)
    return rounds, means, stds, times


def _new_figure(width: float = 7.0, height: float = 4.5):
    """A figure on its own Agg canvas: no pyplot, no global backend switch, nothing left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(ax) -> None:
    """Rounds are whole numbers: no 1.25 on a round axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, out_dir: str, name: str) -> List[str]:
    import matplotlib

    paths = []
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text (searchable, editable)
        for fmt in FORMATS:
            path = os.path.join(out_dir, f"{name}.{fmt}")
            fig.savefig(path, format=fmt, dpi=120, bbox_inches="tight")
            paths.append(path)
    return paths


def _line_plot(groups: Sequence[Group], labels: Sequence[str], key: str, *, vs_time: bool, ylabel: str,
               title: str, scale: float = 1.0, from_zero: bool = False):
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for group, label in zip(groups, labels):
        rounds, means, stds, times = series(group.runs, key, scale)
        xs = times if vs_time else rounds
        points = [(x, m, s) for x, m, s in zip(xs, means, stds) if not math.isnan(x) and m is not None]
        if not points:
            continue
        x, m, s = (list(v) for v in zip(*points))
        line, = ax.plot(x, m, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        if len(group.runs) > 1:
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("wall time (s since the run started)" if vs_time else "round")
    if from_zero:
        ax.set_ylim(bottom=0)
    if not vs_time:
        _integer_ticks(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (mean ± std over seeds)" if any(len(g.runs) > 1 for g in groups) else ""))
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def _time_split_plot(groups: Sequence[Group], labels: Sequence[str]):
    """Per configuration a panel of stacked bars per round: train, aggregate, and the rest of the round (test,
    and waiting for the slowest peer: round_seconds is the slowest working peer's, train/aggregate the mean over
    the peers that trained / aggregated; a peer that sat the round out is not in them, its idle wait neither)."""
    fig = _new_figure(9.0, 2.8 * len(groups) + 0.8)
    for index, (group, label) in enumerate(zip(groups, labels), 1):
        ax = fig.add_subplot(len(groups), 1, index)
        rounds, train, _, _ = series(group.runs, "train_seconds")
        train_by = dict(zip(rounds, train))
        rounds_a, aggregate, _, _ = series(group.runs, "aggregation_seconds")
        aggregate_by = dict(zip(rounds_a, aggregate))
        rounds_t, total, _, _ = series(group.runs, "round_seconds")
        t = [train_by.get(r, 0.0) for r in rounds_t]
        a = [aggregate_by.get(r, 0.0) for r in rounds_t]
        rest = [max(0.0, s - x - y) for s, x, y in zip(total, t, a)]
        ax.bar(rounds_t, t, width=0.9, label="train")
        ax.bar(rounds_t, a, width=0.9, bottom=t, label="aggregate (MAR)")
        ax.bar(rounds_t, rest, width=0.9, bottom=[x + y for x, y in zip(t, a)],
               label="test + waiting (rest of round)")
        ax.set_ylabel("seconds")
        ax.set_title(label, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
        if index == 1:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.axes[-1].set_xlabel("round")
    for ax in fig.axes:
        _integer_ticks(ax)
    fig.suptitle("round time split" + (" (mean over seeds)" if any(len(g.runs) > 1 for g in groups) else ""))
    return fig


def plot_groups(groups: Sequence[Group], labels: Sequence[str], out_dir: str) -> List[str]:
    """Write every figure (PNG and SVG) for these groups into ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    figures = [
        ("accuracy_vs_round", _line_plot(groups, labels, "test_accuracy", vs_time=False, ylabel="test accuracy (%)",
                                         title="test accuracy")),
        ("accuracy_vs_time", _line_plot(groups, labels, "test_accuracy", vs_time=True, ylabel="test accuracy (%)",
                                        title="test accuracy")),
        ("loss_vs_round", _line_plot(groups, labels, "test_loss", vs_time=False, ylabel="test loss",
                                     title="test loss")),
        ("loss_vs_time", _line_plot(groups, labels, "test_loss", vs_time=True, ylabel="test loss",
                                    title="test loss")),
        ("bytes_per_round", _line_plot(groups, labels, "bytes_sent_per_peer", vs_time=False, scale=MB,
                                       ylabel="MB (10⁶ bytes) sent per peer", from_zero=True,
                                       title="bytes sent per peer per round")),
        ("round_time_split", _time_split_plot(groups, labels)),
    ]
    paths = []
    for name, fig in figures:
        paths += _save(fig, out_dir, name)
    return paths


def write_run_plots(run_dir: str) -> List[str]:
    """The end-of-run plots of one run, in ``RUN_DIR/plots/``; [] (logged) when it has no metrics rows."""
    try:
        run = load_run(run_dir)
    except RunError as e:
        logger.info("no plots: %s", e)
        return []
    groups = group_runs([run])
    return plot_groups(groups, group_labels(groups), os.path.join(run_dir, "plots"))


# ==================== command line ====================


def compare(run_dirs: Sequence[str], out_dir: str, target: Optional[float] = None) -> Optional[str]:
    """Group, plot and tabulate ``run_dirs`` into ``out_dir``; returns the Markdown table (None: no usable run)."""
    runs = load_runs(run_dirs)
    if not runs:
        return None
    groups = group_runs(runs)
    labels = group_labels(groups)
    plot_groups(groups, labels, out_dir)
    rows = table_rows(groups, labels, target)
    table = markdown_table(rows)
    with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
        f.write(csv_text(rows))
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mar_fl.py plot", description=(
        "Compare finished runs: seeds of one configuration become a mean ± std band, each configuration a line "
        "labelled by the flags that differ; prints a Markdown table and writes PNG/SVG plots and table.csv."))
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the plots, table.csv and table.md")
    p.add_argument("--target", type=float, default=None, metavar="ACC",
                   help="target test accuracy (%%) for rounds/seconds to target (default: each run's --target-acc "
                        "if it was set, else no such columns)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    table = compare(args.run_dirs, args.out, args.target)
    if table is None:
        print("no run with metrics to plot", file=sys.stderr)
        return 1
    print(table)
    print(f"\nplots, table.csv and table.md written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
