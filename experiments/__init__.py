"""One command per claim of the MAR-FL paper (arXiv:2512.05234), each a small runner over ``mar_fl.py``.

``python experiments/<name>.py [--quick] [--out DIR]``: ``comm_bytes`` (traffic against N), ``participation``
(accuracy against participation), ``mkd_ablation`` (rounds to a target accuracy with knowledge distillation),
``privacy_utility`` (accuracy against ε under DP). Shared helpers are in :mod:`experiments.common`.
"""
