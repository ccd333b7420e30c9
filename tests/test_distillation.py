"""Knowledge distillation pieces (no network): λ schedule, K, teacher choice, scoring and one distillation."""
import numpy as np
import torch
import torch.nn as nn

import ml_tasks as mt
from config_setup import kd_rounds_for, parse_config


def test_lambda_schedule():
    weights = [mt.kd_loss_weights(t, kd_rounds=4, no_blending=False, private=False) for t in range(1, 7)]
    assert [w.kl_weight for w in weights] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert all(w.kl_weight + w.ce_weight == 1.0 for w in weights)
    assert mt.kd_loss_weights(3, kd_rounds=4, no_blending=True, private=False) == mt.KdLoss(1.0, 1.0)
    assert mt.kd_loss_weights(3, kd_rounds=4, no_blending=False, private=True) == mt.KdLoss(1.0, 0.0)


def test_kd_rounds_from_dataset_passes_and_overrides():
    # MNIST, 16 peers, batch 64: 3750 samples = 59 batches per partition, 4 per round -> 14 rounds per pass
    cfg = parse_config(["--np", "16", "--kd", "--ds", "2", "--iv", "4"])
    assert kd_rounds_for(cfg, num_samples=60000) == 28
    assert kd_rounds_for(parse_config(["--np", "16", "--kd", "--kd-rounds", "7"]), num_samples=60000) == 7
    assert kd_rounds_for(parse_config(["--kd", "--nb", "--rounds", "90"]), num_samples=60000) == 90


def test_teacher_count_and_selection():
    assert [mt.num_teachers(c, use_all=False) for c in (1, 2, 3, 5, 10)] == [1, 1, 1, 2, 4]
    assert mt.num_teachers(3, use_all=True) == 3
    scores = {4: 0.3, 1: 0.1, 7: 0.9, 2: 0.1}
    assert mt.select_teachers(scores, 2) == [1, 2]
    assert mt.select_teachers(scores, 3) == [1, 2, 4]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x)


def make_task():
    return mt.Task(name="tiny", load=None, make_model=Tiny, prepare=None,
                   make_batch=lambda data, idx, device: (torch.as_tensor(data.inputs[idx]),
                                                         torch.as_tensor(data.labels[idx])))


def test_scoring_prefers_the_closest_teacher_and_distillation_moves_towards_it():
    torch.manual_seed(0)
    task = make_task()
    data = mt.ArrayDataset(np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32),
                           np.random.default_rng(1).integers(0, 3, 200))
    student = Tiny()
    params = task.trainable(student)
    near = [p.detach() + 0.01 * torch.randn_like(p) for p in params]
    far = [p.detach() + 3.0 * torch.randn_like(p) for p in params]
    batches = mt.distillation_batches(task, data, np.arange(200), seed=1, peer=0, round_index=1, step=0,
                                      batch_size=10, device=torch.device("cpu"))
    assert len(batches) == mt.KD_BATCHES
    seen = np.concatenate([x.numpy() for x, _ in batches])
    assert len(np.unique(seen, axis=0)) == len(seen)  # distinct samples
    scores, logits = mt.score_teachers(task, student, Tiny(), {3: far, 5: near}, batches)
    assert mt.select_teachers(scores, 1) == [5]
    target = logits[3]
    with torch.no_grad():
        before = sum(float(mt.kl_to_student(student(x), t)) for (x, _), t in zip(batches, target))
    momentum = [torch.zeros_like(p) for p in params]
    for _ in range(20):
        mt.distill(task, student, momentum, batches=batches, teacher_logits=target,
                   weights=mt.KdLoss(1.0, 0.0), lr=0.1, beta=0.9)
    with torch.no_grad():
        after = sum(float(mt.kl_to_student(student(x), t)) for (x, _), t in zip(batches, target))
    assert after < 0.5 * before
