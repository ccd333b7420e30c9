#!/usr/bin/env python3
"""Centralized baseline of a federated run: the same model trained by one process on all the training data.

    python bench/news_centralized.py --ml news --np 16 --iv 4 --rounds 100 [any mar_fl.py flag] [--out FILE]

Takes ``mar_fl.py``'s flags and trains with the same batch size, learning rate (``--lr-drop-*`` included),
momentum rule, seed and task preparation (the cached embeddings for ``--ml news``). One "round" here is
``--np`` × (mini-batches per round) steps over a single shuffled order of the whole training set, so after R
rounds the model has seen as many samples as N peers together after R federated rounds. Evaluates on the whole
test set on the rounds a federated run tests (``--tf`` and the last) and prints one line per tested round;
``--out`` also writes the rows and a summary as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cfg, *, run_dir: str):
    import numpy as np
    import torch

    from config_setup import learning_rate, mini_batches_per_round, set_all_seeds
    from mar_fl import should_test
    from ml_tasks import BatchOrder, evaluate, get_task, train_batches

    task = get_task(cfg.task)
    prepared = task.prepare(cfg, run_dir)
    train, test = task.load(prepared)
    torch.set_num_threads(1)  # one core, like one peer
    set_all_seeds(cfg.seed)
    model = task.make_model(prepared)
    momentum = [torch.zeros_like(p) for p in task.trainable(model)]
    order = BatchOrder(indices=np.arange(len(train)), seed=cfg.seed, peer=0)
    steps = cfg.num_peers * mini_batches_per_round(cfg, num_samples=len(train))
    rows, started = [], time.time()
    for round_index in range(1, cfg.rounds + 1):
        lr = learning_rate(cfg, round_index)
        loss = train_batches(task, model, momentum, data=train, order=order, num_batches=steps,
                             batch_size=cfg.batch_size, lr=lr, beta=cfg.momentum, device=torch.device("cpu"))
        if not should_test(cfg, round_index, cfg.rounds):
            continue
        result = evaluate(task, model, data=test, indices=np.arange(len(test)), device=torch.device("cpu"))
        accuracy = 100.0 * result["test_correct"] / result["test_count"]
        rows.append({"round": round_index, "learning_rate": lr, "train_loss": loss, "test_accuracy": accuracy,
                     "test_loss": result["test_loss_sum"] / result["test_count"],
                     "samples": round_index * steps * cfg.batch_size})
        print(f"round {round_index:>4}/{cfg.rounds} | acc {accuracy:6.2f}% | loss {rows[-1]['test_loss']:.4f} | "
              f"lr {lr:g} | {time.time() - started:.1f} s", flush=True)
    summary = {"final_test_accuracy": rows[-1]["test_accuracy"],
               "best_test_accuracy": max(r["test_accuracy"] for r in rows), "steps_per_round": steps,
               "samples": cfg.rounds * steps * cfg.batch_size, "seconds": round(time.time() - started, 1)}
    return rows, summary


def main(argv=None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", help="write rows and summary as JSON here")
    args, rest = own.parse_known_args(argv)
    from config_setup import ConfigError, parse_config
    from ml_tasks import DataError

    try:
        cfg = parse_config(rest + ["--wandb", "disabled"])
        with tempfile.TemporaryDirectory(prefix="centralized-") as tmp:
            rows, summary = run(cfg, run_dir=cfg.run_dir or tmp)
    except (ConfigError, DataError) as e:
        print(f"news_centralized.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": cfg.to_json(), "rows": rows, "summary": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sys.exit(main())
