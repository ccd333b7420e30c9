"""Shared helpers of the experiment runners: run ``mar_fl.py`` configurations, read their results, aggregate
seeds, write tables and figures.

Every configuration is a :class:`RunSpec` (a name, the ``mar_fl.py`` flags, labels for the table). Before the
first run, :func:`check_flags` parses every spec's flags with ``mar_fl.py``'s own parser, so a flag this checkout
does not know stops the experiment with one line (exit 2) instead of hours in. :func:`run_all` then runs the
specs one after another, each as ``python mar_fl.py FLAGS --run-dir OUT/runs/NAME --data-dir D --wandb disabled``
with its output in ``OUT/logs/NAME.log``. A run dir whose ``experiment.json`` records the same flags and a
finished run is reused (a stopped experiment continues where it was); any other run dir of that name is moved
aside to ``OUT/moved_aside/``, never deleted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAR_FL = os.path.join(ROOT, "mar_fl.py")
for _path in (ROOT, os.path.join(ROOT, "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# hivemind scripts a function with torch.jit at import (closed forms import moshpit_all_reduce): torch's business
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

import plots  # noqa: E402 - scripts/plots.py: read_rows and mean_std, the plot command's own

MB = 1e6
EXIT_USAGE = 2
MARKER = "experiment.json"  # in each run dir: the flags it ran with and the launcher's exit status
REUSABLE_STATUSES = ("completed", "diverged")  # a rerun would give the same result; degraded/failed runs rerun
FIXED_FLAGS = ("--wandb", "disabled")  # experiment runs never log to wandb
QUICK_NOTE = "`--quick`: sizes for a smoke test (tests, CI); too small to judge the claim: run the full size."


class ExperimentError(RuntimeError):
    """Something that stops the experiment before or between runs; the runner prints it as one line, exit 2."""


@dataclass(frozen=True)
class RunSpec:
    """One ``mar_fl.py`` run of an experiment.

    :param name: run dir name under ``OUT/runs`` (unique within the experiment)
    :param flags: the ``mar_fl.py`` flags (without ``--run-dir``, ``--data-dir`` and ``--wandb``)
    :param labels: what the tables group by (method, N, seed, ...)
    """

    name: str
    flags: Tuple[str, ...]
    labels: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """A finished (or failed) run: its exit status, ``summary.json`` ({} if none) and ``metrics.jsonl`` rows."""

    spec: RunSpec
    run_dir: str
    exit_code: int
    summary: Dict[str, Any]
    rows: List[Dict[str, Any]]
    reused: bool = False

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or f"exit {self.exit_code}")

    @property
    def ok(self) -> bool:
        """Completed with metrics: its numbers are those of the run that was asked for."""
        return self.status == "completed" and bool(self.rows)


# ==================== layouts, lists, command line ====================


def mar_layout(num_peers: int, group_size: int = 4) -> Tuple[int, int, int]:
    """``(gs, gk, ni)`` for N peers: gk = ni = ⌈log_gs N⌉ (at least 1), so N = gs^gk is the exact grid and other
    N get the README's general rule. Integer arithmetic: no float log rounding at N = gs^k."""
    if group_size < 2:
        raise ValueError(f"the MAR group size must be at least 2, got {group_size}")
    key_dim, span = 1, group_size
    while span < num_peers:
        key_dim, span = key_dim + 1, span * group_size
    return group_size, key_dim, key_dim


def layout_flags(num_peers: int, group_size: int = 4) -> List[str]:
    gs, gk, ni = mar_layout(num_peers, group_size)
    return ["--np", str(num_peers), "--gs", str(gs), "--gk", str(gk), "--ni", str(ni)]


def parse_list(text: str, cast: Callable[[str], Any] = str) -> List[Any]:
    """``"a,b,c"`` → ``[cast(a), cast(b), cast(c)]``; integer ranges ``"0-2"`` when ``cast`` is int."""
    values: List[Any] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if cast is int and "-" in item[1:]:
            low, high = item.split("-", 1)
            values += list(range(int(low), int(high) + 1))
        else:
            values.append(cast(item))
    return values


def list_arg(cast: Callable[[str], Any], choices: Optional[Iterable[str]] = None) -> Callable[[str], List[Any]]:
    """An argparse type for comma-separated lists (one-line error for an unknown or malformed item)."""
    allowed = list(choices) if choices is not None else None

    def parse(text: str) -> List[Any]:
        try:
            values = parse_list(text, cast)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {cast.__name__}: {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("an empty list")
        if allowed is not None and any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}, got {text!r}")
        return values

    return parse


def default_data_dir() -> str:
    """``$MARFL_DATA_DIR``, else ``../shared/data`` next to the repository when it exists, else ``./data``."""
    shared = os.path.join(ROOT, "..", "shared", "data")
    return os.environ.get("MARFL_DATA_DIR") or (shared if os.path.isdir(shared) else "./data")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like mar_fl.py
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def base_parser(prog: str, description: str, *, seeds: str) -> argparse.ArgumentParser:
    """The options every runner has: ``--quick``, ``--out``, ``--data-dir``, ``--seeds``."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes on 2 cores; tests and CI)")
    p.add_argument("--out", default=None, help="output folder (default results/<experiment>[-quick])")
    p.add_argument("--data-dir", default=default_data_dir(), help="dataset root (MNIST/raw, 20newsgroups/)")
    p.add_argument("--seeds", type=list_arg(int), default=None,
                   help=f"seeds, e.g. 0,1,2 or 0-4 (default: {seeds})")
    return p


def out_dir(args: argparse.Namespace, experiment: str) -> str:
    return args.out or os.path.join("results", experiment + ("-quick" if args.quick else ""))


# ==================== checking and running ====================


def supports_flag(flag: str) -> bool:
    """Whether this checkout's ``mar_fl.py`` knows ``flag`` (its own parser)."""
    from config_setup import build_parser

    return flag in build_parser()._option_string_actions


def check_flags(specs: Sequence[RunSpec]) -> None:
    """Parse every spec's flags with ``mar_fl.py``'s parser and checks (nothing starts); ExperimentError naming
    the first run whose flags ``mar_fl.py`` refuses."""
    from config_setup import ConfigError, parse_config

    for spec in specs:
        try:
            parse_config([*spec.flags, *FIXED_FLAGS])
        except ConfigError as e:
            raise ExperimentError(f"mar_fl.py refuses the flags of run {spec.name} "
                                  f"({' '.join(spec.flags)}): {' '.join(str(e).splitlines())}") from None


read_json = plots._read_json  # a JSON object from a path; {} when it is missing or damaged


def read_marker(run_dir: str) -> Dict[str, Any]:
    return read_json(os.path.join(run_dir, MARKER))


def load_result(spec: RunSpec, run_dir: str, exit_code: int, *, reused: bool = False) -> RunResult:
    return RunResult(spec=spec, run_dir=run_dir, exit_code=exit_code,
                     summary=read_json(os.path.join(run_dir, "summary.json")),
                     rows=plots.read_rows(os.path.join(run_dir, "metrics.jsonl")), reused=reused)


def reusable(spec: RunSpec, run_dir: str) -> bool:
    """The run dir holds a finished run of exactly these flags."""
    marker = read_marker(run_dir)
    summary = read_json(os.path.join(run_dir, "summary.json"))
    return marker.get("flags") == list(spec.flags) and summary.get("status") in REUSABLE_STATUSES


def move_aside(run_dir: str, aside_root: str) -> str:
    """Move an earlier run dir out of the way (never delete results); returns where it went."""
    os.makedirs(aside_root, exist_ok=True)
    target = os.path.join(aside_root, f"{os.path.basename(run_dir)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    shutil.move(run_dir, target)
    return target


def _wait(proc: subprocess.Popen) -> int:
    """Wait for the launcher; if we are interrupted, pass it on (SIGINT: it stops its peers cleanly) and wait."""
    try:
        return proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
        raise


def refusal_line(log_path: str) -> str:
    """The launcher's one-line refusal (``mar_fl.py: error: ...``) from its log, else its last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return next((line for line in reversed(lines) if line.startswith("mar_fl.py: error:")),
                lines[-1] if lines else "no output")


def run_spec(spec: RunSpec, *, out: str, data_dir: str, position: str = "") -> RunResult:
    """Run one spec (or reuse its finished run dir). Exit 2 from ``mar_fl.py`` (flags or data refused) raises
    ExperimentError; any other failure is returned with its status for the table to show.

    :param out: the experiment's output folder (runs in ``out/runs``, logs in ``out/logs``)
    :param data_dir: ``--data-dir`` for ``mar_fl.py``
    :param position: progress prefix such as ``[3/12]``
    """
    run_dir = os.path.abspath(os.path.join(out, "runs", spec.name))  # the launcher runs in ROOT, not our cwd
    if reusable(spec, run_dir):
        print(f"{position} {spec.name}: reusing the finished run in {run_dir}", flush=True)
        return load_result(spec, run_dir, int(read_marker(run_dir).get("exit_code", 0)), reused=True)
    if os.path.exists(run_dir):
        print(f"{position} {spec.name}: earlier run moved to {move_aside(run_dir, os.path.join(out, 'moved_aside'))}",
              flush=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log_path = os.path.join(out, "logs", f"{spec.name}.log")
    command = [sys.executable, MAR_FL, *spec.flags, "--run-dir", run_dir, "--data-dir", os.path.abspath(data_dir),
               *FIXED_FLAGS]
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        code = _wait(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    if code == EXIT_USAGE:
        raise ExperimentError(f"run {spec.name}: {refusal_line(log_path)} (log: {log_path})")
    if os.path.isdir(run_dir):
        with open(os.path.join(run_dir, MARKER), "w") as f:
            json.dump({"flags": list(spec.flags), "exit_code": code, "labels": dict(spec.labels)}, f, indent=2)
    result = load_result(spec, run_dir, code)
    print(f"{position} {spec.name}: {result.status} in {time.time() - started:.0f} s"
          + ("" if code == 0 else f" (exit {code}; log: {log_path})"), flush=True)
    return result


def run_all(specs: Sequence[RunSpec], *, out: str, data_dir: str) -> List[RunResult]:
    """Check every spec's flags, then run them one after another (see :func:`run_spec`)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ExperimentError("two runs of this experiment share a name")  # a bug in the runner, not user input
    check_flags(specs)
    return [run_spec(spec, out=out, data_dir=data_dir, position=f"[{i}/{len(specs)}]")
            for i, spec in enumerate(specs, 1)]


def main_guard(body: Callable[[], int], prog: str) -> int:
    """Run a runner's body: ExperimentError → one line on stderr and exit 2; SIGTERM stops the current run."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return body()
    except ExperimentError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


# ==================== reading results ====================


def mean_over_rows(rows: Sequence[Mapping[str, Any]], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def last_value(rows: Sequence[Mapping[str, Any]], key: str) -> Optional[float]:
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def target_hit(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], target: float
               ) -> Tuple[Optional[int], Optional[float]]:
    """(round, elapsed seconds) at which test accuracy first reached ``target`` percent, or (None, None).

    From ``summary["accuracy_targets"]`` (``{"50": {"round": r, "seconds": s}}``) when it has this target, else
    from the metrics rows (``test_accuracy``, ``elapsed_seconds``): only tested rounds count.
    """
    recorded = summary.get("accuracy_targets")
    if isinstance(recorded, Mapping):
        for key, value in recorded.items():
            try:
                same = math.isclose(float(key), target)
            except ValueError:
                continue
            if same and isinstance(value, Mapping):
                return value.get("round"), value.get("seconds")
    for row in rows:
        accuracy = row.get("test_accuracy")
        if isinstance(accuracy, (int, float)) and accuracy >= target:
            return row["round"], row.get("elapsed_seconds")
    return None, None


def mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    """Mean, sample std (0 for one value) and count of the values that are not None/NaN (the plot command's)."""
    return plots.mean_std(values)


def pm(values: Sequence[Optional[float]], spec: str = ".2f", *, of: Optional[int] = None) -> str:
    """``mean ± std`` over the values that exist (no ± for one); ``—`` for none; ``(k/n)`` when ``of`` = n
    values were expected and only k exist."""
    mean, std, n = mean_std(values)
    if mean is None:
        text = "—"
    else:
        text = format(mean, spec) if n < 2 else f"{format(mean, spec)} ± {format(std, spec)}"
    return text + (f" ({n}/{of})" if of is not None and n != of else "")


def statuses(results: Sequence[RunResult]) -> str:
    """``completed`` when all are, else the count of each status."""
    counts: Dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(s if n == len(results) else f"{n}× {s}" for s, n in counts.items())


def group_by(results: Sequence[RunResult], *keys: str) -> Dict[Tuple[Any, ...], List[RunResult]]:
    """Results grouped by their labels' values for ``keys`` (seeds of one configuration), in first-seen order."""
    groups: Dict[Tuple[Any, ...], List[RunResult]] = {}
    for r in results:
        groups.setdefault(tuple(r.spec.labels.get(k) for k in keys), []).append(r)
    return groups


# ==================== writing tables and figures ====================


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: str, *, title: str, tables: Sequence[Tuple[str, str]], notes: Sequence[str],
                  results: Dict[str, Any]) -> str:
    """Write ``out/table.md`` (title, each (heading, table), notes) and ``out/results.json``; returns the
    Markdown text."""
    parts = [f"# {title}", ""]
    for heading, table in tables:
        parts += ([f"## {heading}", ""] if heading else []) + [table, ""]
    parts += [f"* {n}" for n in notes]
    text = "\n".join(parts).rstrip() + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return text


def run_records(results: Sequence[RunResult]) -> List[Dict[str, Any]]:
    """What results.json says about each run: name, labels, flags, run dir, status, exit code."""
    return [{"name": r.spec.name, "labels": dict(r.spec.labels), "flags": list(r.spec.flags), "run_dir": r.run_dir,
             "status": r.status, "exit_code": r.exit_code, "reused": r.reused} for r in results]


def plot_runs(run_dirs: Sequence[str], out: str, *, target: Optional[float] = None) -> bool:
    """Per-run curves with the project's plot command (``mar_fl.py plot RUN_DIR... --out DIR``); a failure is
    a warning (the table is the result), returned as False."""
    dirs = [os.path.abspath(d) for d in run_dirs if os.path.isfile(os.path.join(d, "metrics.jsonl"))]
    if not dirs:
        return False
    command = [sys.executable, MAR_FL, "plot", *dirs, "--out", os.path.abspath(out)]
    command += ["--target", f"{target:g}"] if target is not None else []
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        print(f"warning: plots for {out} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return False
    return True


def new_figure(width: float = 7.0, height: float = 4.5):
    """A matplotlib figure on its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, out: str, name: str) -> List[str]:
    """``out/name.png`` and ``out/name.svg``; returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"{name}.{fmt}") for fmt in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return paths
