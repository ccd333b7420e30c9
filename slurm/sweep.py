#!/usr/bin/env python3
"""Print (or submit) the ``sbatch`` lines of a grid of MAR-FL configurations.

    python slurm/sweep.py --seeds 0-4 --vary=--gs=2,4 --vary="--kd=,--kd" -- --np 16 --rounds 200
    python slurm/sweep.py --seeds 0-2 --submit -- --np 64 --pp 32

Each combination of the ``--vary`` values becomes one job array (one task per seed, ``-sd`` = the array index);
the flags after ``--`` go to every job. An empty value (``--kd=``) leaves the flag out; a value equal to the
flag name (``--kd=--kd``) passes a switch. ``--multinode`` uses the multi-node script.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from typing import List, Sequence, Tuple

HERE = "slurm"


def parse_vary(spec: str) -> Tuple[str, List[str]]:
    flag, _, values = spec.partition("=")
    if not flag.startswith("-") or not _:
        raise SystemExit(f"sweep.py: --vary wants FLAG=V1,V2 (e.g. --gs=2,4), got {spec!r}")
    return flag, values.split(",")


def combinations(varies: Sequence[Tuple[str, List[str]]]) -> List[List[str]]:
    grid = []
    for choice in itertools.product(*[[(flag, v) for v in values] for flag, values in varies]):
        args: List[str] = []
        for flag, value in choice:
            if value == "":
                continue
            args += [flag] if value == flag else [flag, value]
        grid.append(args)
    return grid


def sbatch_lines(*, seeds: str, varies, common: Sequence[str], multinode: bool, sbatch_args: Sequence[str]):
    script = f"{HERE}/mar_fl_multinode.sbatch" if multinode else f"{HERE}/mar_fl.sbatch"
    for args in combinations(varies):
        name = "mar-fl" + "".join(f"_{a.lstrip('-')}" for a in args)
        yield ["sbatch", f"--array={seeds}", f"--job-name={name}", *sbatch_args, script, *args, *common]


def main(argv: Sequence[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-4", help="array range of seeds (sbatch --array syntax)")
    parser.add_argument("--vary", action="append", default=[], help="FLAG=V1,V2 (repeatable: a grid)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, e.g. --time=4:00:00")
    parser.add_argument("--multinode", action="store_true")
    parser.add_argument("--submit", action="store_true", help="run the sbatch lines instead of printing them")
    opts, unknown = parser.parse_known_args(own)
    # argparse reads "--vary --gs=2,4" as --vary with value "--gs=2,4" only when written --vary=--gs=2,4
    varies = [parse_vary(v) for v in opts.vary] + [parse_vary(u) for u in unknown]
    for line in sbatch_lines(seeds=opts.seeds, varies=varies, common=common, multinode=opts.multinode,
                             sbatch_args=opts.sbatch_arg):
        print(shlex.join(line))
        if opts.submit and subprocess.run(line).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
