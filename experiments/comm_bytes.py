#!/usr/bin/env python3
"""Claim 1: MAR's traffic grows as O(N log N) in total, far below all-to-all P2P (RDFL), on par with FedAvg.

``python experiments/comm_bytes.py [--quick] [--out DIR] [--methods mar,rdfl,fedavg,gossip] [--sizes 4,8,16,32]``

(a) **measured**: short real runs (``--rounds``, default 2; MNIST) of each method for each N in ``--sizes``; bytes
sent per peer per round are the mean of ``bytes_sent_per_peer`` over the rounds of ``metrics.jsonl``.
(b) **computed** from the schedule, no training, N = 4, 8, 16, … up to ``--max-n`` (4096) and the paper's
N = 125 with gs = 5, with P = the MNIST CNN's trainable parameters + momentum in float32 (:func:`payload_bytes`):

* mar: per peer per round Σ over the ni steps of 2(M−1)/M·P, M = the size of that peer's group in that step
  from ``moshpit_all_reduce.simulate_schedule(N, gs, gk, ni)`` (butterfly all-reduce: reduce-scatter and
  all-gather each send (M−1)/M of the tensors); gs = ``--gs`` (4) and gk = ni = ⌈log_gs N⌉, the exact grid
  when N = gs^gk (:func:`experiments.common.mar_layout`); the measured runs use the same layout.
* rdfl: (N−1)·P (every peer sends its model to every other peer).
* fedavg: P per client (upload) and N·P at the server (the broadcast); total 2·N·P.
* gossip: k·P per peer (push-pull with k = ``--gossip-peers`` peers, at most N−1).

Totals over all peers are per-peer × N (fedavg: N·P of the clients + N·P of the server). Writes ``table.md``,
``results.json``, ``bytes_vs_n.{png,svg}`` (the summary curve) and ``plots/`` (per-run curves of the measured runs).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: the repository root on sys.path, for `experiments.common`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import common  # noqa: E402

METHODS = ("mar", "rdfl", "fedavg", "gossip")
STYLES = {"mar": "-", "rdfl": "-", "fedavg": "-.", "gossip": ":"}  # fedavg and gossip (k = 2) totals coincide
QUICK = {"sizes": [4, 8], "rounds": 2, "seeds": [0]}
FULL = {"sizes": [4, 8, 16, 32], "rounds": 2, "seeds": [0]}
PAPER_POINT = (125, 5)  # the paper's N = 125 (gs = 5, gk = ni = 3: the exact grid)


# ==================== closed forms ====================


def payload_bytes(task: str = "mnist") -> int:
    """P: bytes of the task model's trainable parameters plus a momentum buffer of each (what MAR averages),
    from ``ml_tasks`` without data or training. Only MNIST (the news head's size depends on the encoder)."""
    from ml_tasks import get_task

    if task != "mnist":
        raise ValueError("payload_bytes: only the MNIST model's size is known without data")
    model_task = get_task(task)
    params = model_task.trainable(model_task.make_model({}))
    return 2 * sum(p.numel() * p.element_size() for p in params)


def mar_group_sizes(num_peers: int, *, group_size: int, key_dim: int, steps: int) -> List[List[int]]:
    """Per MAR step, the size of each peer's group (index = the peer's position), all peers present."""
    from moshpit_all_reduce import simulate_schedule

    sizes = []
    for groups in simulate_schedule(num_peers, group_size, key_dim, steps):
        step = [0] * num_peers
        for members in groups.values():
            for position in members:
                step[position] = len(members)
        sizes.append(step)
    return sizes


@dataclass(frozen=True)
class RoundBytes:
    """Bytes sent in one round: mean per peer (fedavg: per client), by the server (fedavg only), and in total."""

    per_peer: float
    total: float
    server: float = 0.0


def closed_form_bytes(method: str, n: int, payload: float, *, gs: int = 4, gk: Optional[int] = None,
                      ni: Optional[int] = None, k: int = 2) -> RoundBytes:
    """Bytes sent per round from the schedule alone (no training; see the module docstring for each formula).

    :param method: ``mar``, ``rdfl``, ``fedavg`` or ``gossip``
    :param n: number of peers N (all taking part)
    :param payload: P, bytes of one model + momentum
    :param gs: MAR group size; :param gk:, :param ni: MAR key dimension and steps (default ⌈log_gs N⌉ each)
    :param k: gossip peers per round
    """
    if n < 1 or payload < 0:
        raise ValueError(f"need n >= 1 and payload >= 0, got n={n}, payload={payload}")
    if method == "mar":
        _, default_dim, _ = common.mar_layout(n, gs)
        sizes = mar_group_sizes(n, group_size=gs, key_dim=default_dim if gk is None else gk,
                                 steps=default_dim if ni is None else ni)
        total = sum(2 * (m - 1) / m * payload for step in sizes for m in step)
        return RoundBytes(per_peer=total / n, total=total)
    if method == "rdfl":
        return RoundBytes(per_peer=(n - 1) * payload, total=n * (n - 1) * payload)
    if method == "fedavg":
        return RoundBytes(per_peer=payload, total=2 * n * payload, server=n * payload)
    if method == "gossip":
        per_peer = min(k, n - 1) * payload
        return RoundBytes(per_peer=per_peer, total=n * per_peer)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def closed_form_sizes(max_n: int) -> List[int]:
    """N = 4, 8, 16, … up to ``max_n``."""
    sizes, n = [], 4
    while n <= max_n:
        sizes.append(n)
        n *= 2
    return sizes


# ==================== runs ====================


def method_flags(method: str, *, gossip_peers: int) -> List[str]:
    """``mar_fl.py`` flags selecting the method (mar is the default aggregation: no flag, so it runs anywhere)."""
    if method == "mar":
        return []
    return ["--aggregation", method] + (["--gossip-peers", str(gossip_peers)] if method == "gossip" else [])


def build_specs(*, methods: Sequence[str], sizes: Sequence[int], seeds: Sequence[int], rounds: int, gs: int,
                gossip_peers: int) -> List[common.RunSpec]:
    """One short run per (method, N, seed): ``--iv 1``, tested only at its last round (``--tf`` = rounds)."""
    specs = []
    for method in methods:
        for n in sizes:
            for seed in seeds:
                flags = [*common.layout_flags(n, gs), "--rounds", str(rounds), "--iv", "1", "--tf", str(rounds),
                         "-sd", str(seed), *method_flags(method, gossip_peers=gossip_peers)]
                specs.append(common.RunSpec(name=f"{method}-n{n}-s{seed}", flags=tuple(flags),
                                            labels={"method": method, "n": n, "seed": seed}))
    return specs


def measured_rows(results: Sequence[common.RunResult], *, payload: float, gs: int, gossip_peers: int
                  ) -> List[Dict[str, Any]]:
    """Per (method, N): measured bytes sent per peer per round (mean over rounds, then over seeds), the computed
    figure and their ratio."""
    rows = []
    for (method, n), group in common.group_by(results, "method", "n").items():
        ok = [r for r in group if r.rows]
        sent = [common.mean_over_rows(r.rows, "bytes_sent_per_peer") for r in ok]
        received = [common.mean_over_rows(r.rows, "bytes_received_per_peer") for r in ok]
        server = [common.mean_over_rows(r.rows, "server_bytes_sent") or 0.0 for r in ok]  # fedavg's server
        mean_sent, std_sent, count = common.mean_std(sent)
        mean_server = common.mean_std(server)[0] or 0.0
        computed = closed_form_bytes(method, n, payload, gs=gs, k=gossip_peers)
        rows.append({
            "method": method, "n": n, "layout": common.mar_layout(n, gs), "runs": len(group),
            "status": common.statuses(group),
            "measured_sent_per_peer": mean_sent, "measured_sent_per_peer_std": std_sent, "measured_runs": count,
            "measured_received_per_peer": common.mean_std(received)[0], "measured_server": mean_server,
            "measured_total": None if mean_sent is None else mean_sent * n + mean_server,
            "computed_per_peer": computed.per_peer, "computed_server": computed.server,
            "ratio": mean_sent / computed.per_peer if mean_sent is not None and computed.per_peer else None,
            "rounds": [len(r.rows) for r in group],
        })
    return rows


def closed_form_rows(sizes: Sequence[int], *, payload: float, gs: int, gossip_peers: int) -> List[Dict[str, Any]]:
    rows = []
    for n, group_size in [(n, gs) for n in sizes] + [PAPER_POINT]:
        figures = {m: asdict(closed_form_bytes(m, n, payload, gs=group_size, k=gossip_peers)) for m in METHODS}
        rows.append({"n": n, "gs": group_size, "gk_ni": common.mar_layout(n, group_size)[1], **figures})
    return rows


# ==================== tables and figure ====================


def _mb(value: Optional[float], spec: str = ",.2f") -> str:
    return "—" if value is None else format(value / common.MB, spec)


def measured_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ["method", "N", "gs/gk/ni", "runs", "measured MB sent/peer/round", "computed MB/peer/round",
            "measured / computed", "measured MB/round, all peers (+ server)", "status"]
    body = []
    for r in rows:
        measured = r["measured_sent_per_peer"]
        spread = "" if r["measured_runs"] < 2 else f" ± {_mb(r['measured_sent_per_peer_std'])}"
        computed = _mb(r["computed_per_peer"]) + (f" (server {_mb(r['computed_server'])})"
                                                  if r["computed_server"] else "")
        body.append([r["method"], r["n"], "/".join(map(str, r["layout"])), r["runs"], _mb(measured) + spread,
                     computed, "—" if r["ratio"] is None else f"{r['ratio']:.4f}",
                     _mb(r["measured_total"]), r["status"]])
    return common.markdown_table(head, body)


def closed_form_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ["N", "gs", "gk = ni", "mar MB/peer", "rdfl MB/peer", "fedavg MB/client (server)", "gossip MB/peer",
            "mar GB total", "rdfl GB total", "fedavg GB total", "gossip GB total", "rdfl / mar", "mar / fedavg total"]
    body = []
    for r in rows:
        gb = lambda m: format(r[m]["total"] / 1e9, ",.3f")  # noqa: E731
        body.append([r["n"], r["gs"], r["gk_ni"], _mb(r["mar"]["per_peer"]), _mb(r["rdfl"]["per_peer"]),
                     f"{_mb(r['fedavg']['per_peer'])} ({_mb(r['fedavg']['server'])})", _mb(r["gossip"]["per_peer"]),
                     gb("mar"), gb("rdfl"), gb("fedavg"), gb("gossip"),
                     f"{r['rdfl']['total'] / r['mar']['total']:.1f}",
                     f"{r['mar']['total'] / r['fedavg']['total']:.2f}"])
    return common.markdown_table(head, body)


def plot_summary(closed: Sequence[Dict[str, Any]], measured: Sequence[Dict[str, Any]], out: str, *, gs: int
                 ) -> List[str]:
    """Per-peer and total bytes per round against N (log-log): closed forms as lines, measured runs as markers."""
    fig = common.new_figure(11.0, 4.5)
    grid = [r for r in closed if r["gs"] == gs]
    for index, (key, title, scale) in enumerate((("per_peer", "sent per peer per round", common.MB),
                                                 ("total", "sent per round, all peers", 1e9)), 1):
        ax = fig.add_subplot(1, 2, index)
        for method in METHODS:
            line, = ax.plot([r["n"] for r in grid], [r[method][key] / scale for r in grid], STYLES[method],
                            label=f"{method} (computed)")
            points = [r for r in measured if r["method"] == method and r["measured_sent_per_peer"] is not None]
            if points:
                value = (lambda r: r["measured_sent_per_peer"]) if key == "per_peer" \
                    else (lambda r: r["measured_total"])
                ax.plot([r["n"] for r in points], [value(r) / scale for r in points],
                        "o", color=line.get_color(), label=f"{method} (measured)")
        if key == "per_peer":
            ax.plot([r["n"] for r in grid], [r["fedavg"]["server"] / scale for r in grid], "--", color="grey",
                    label="fedavg server")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("peers N")
        ax.set_ylabel("MB" if scale == common.MB else "GB")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(f"bytes per round against N (MNIST CNN + momentum, MAR gs = {gs}, gk = ni = ⌈log_gs N⌉)")
    return common.save_figure(fig, out, "bytes_vs_n")


# ==================== command line ====================


def build_parser():
    p = common.base_parser("experiments/comm_bytes.py", __doc__.splitlines()[0], seeds="0")
    p.add_argument("--methods", type=common.list_arg(str, METHODS), default=list(METHODS),
                   help="methods to run (the closed forms always cover all)")
    p.add_argument("--sizes", type=common.list_arg(int), default=None,
                   help="N of the measured runs (default: quick 4,8; full 4,8,16,32)")
    p.add_argument("--no-runs", action="store_true", help="only the closed forms (no training, seconds)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per measured run (default 2)")
    p.add_argument("--max-n", type=int, default=4096, help="largest N of the closed forms")
    p.add_argument("--gs", type=int, default=4, help="MAR group size (gk = ni = ceil(log_gs N))")
    p.add_argument("--gossip-peers", type=int, default=2, help="k of gossip (push-pull with k peers)")
    return p


def run(args) -> int:
    if args.gs < 2 or args.max_n < 1 or args.gossip_peers < 1:
        raise common.ExperimentError("--gs must be at least 2, --max-n and --gossip-peers at least 1")
    size = QUICK if args.quick else FULL
    out = common.out_dir(args, "comm_bytes")
    payload = payload_bytes()
    results: List[common.RunResult] = []
    if not args.no_runs:
        specs = build_specs(methods=args.methods, sizes=args.sizes or size["sizes"], seeds=args.seeds or size["seeds"],
                            rounds=args.rounds or size["rounds"], gs=args.gs, gossip_peers=args.gossip_peers)
        results = common.run_all(specs, out=out, data_dir=args.data_dir)
    measured = measured_rows(results, payload=payload, gs=args.gs, gossip_peers=args.gossip_peers)
    closed = closed_form_rows(closed_form_sizes(args.max_n), payload=payload, gs=args.gs,
                              gossip_peers=args.gossip_peers)
    grid = [r for r in closed if r["gs"] == args.gs and r["n"] >= 64]
    growth = (grid[-1]["mar"]["total"] / grid[0]["mar"]["total"],
              grid[-1]["n"] * math.log(grid[-1]["n"]) / (grid[0]["n"] * math.log(grid[0]["n"]))) if len(grid) > 1 \
        else None
    notes = [f"P = {payload:,} bytes (MNIST CNN trainable parameters + momentum, float32).",
             "MB = 10^6 bytes, GB = 10^9. Measured: `bytes_sent_per_peer` of `metrics.jsonl` (protobuf bytes on the "
             "wire, mean over aggregating peers), averaged over the rounds of each run, then over seeds.",
             f"MAR layout: gs = {args.gs}, gk = ni = ceil(log_gs N) (exact global mean when N = gs^gk); the last "
             f"closed-form row is the paper's N = {PAPER_POINT[0]} with gs = {PAPER_POINT[1]}, gk = ni = 3."]
    if growth:
        notes.append(f"MAR total, N = {grid[0]['n']} → {grid[-1]['n']}: × {growth[0]:.1f}; N log N predicts "
                     f"× {growth[1]:.1f}.")
    tables = [("(b) computed from the schedule (no training)", closed_form_table(closed))]
    if measured:
        tables.insert(0, ("(a) measured (real runs)", measured_table(measured)))
    notes += [common.QUICK_NOTE] if args.quick else []
    text = common.write_outputs(out, title="Communication per round against N (claim 1)", tables=tables, notes=notes,
                                results={"experiment": "comm_bytes", "quick": args.quick, "payload_bytes": payload,
                                         "gs": args.gs, "gossip_peers": args.gossip_peers, "measured": measured,
                                         "closed_form": closed, "runs": common.run_records(results)})
    plot_summary(closed, measured, out, gs=args.gs)
    plotted = common.plot_runs([r.run_dir for r in results], os.path.join(out, "plots"))
    print(text)
    print(f"table.md, results.json, bytes_vs_n.png/svg{' and plots/' if plotted else ''} written to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return common.main_guard(lambda: run(args), "experiments/comm_bytes.py")


if __name__ == "__main__":
    sys.exit(main())
