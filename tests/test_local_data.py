"""experiments/speedrun/local_data.py: the offline stdlib corpora (deterministic, disjoint splits, a manifest) and
whether the source corpus holds enough tokens for every config in configs/speedrun."""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import pytest
import yaml

from experiments.speedrun import local_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "speedrun")
SMALL_CHARS = 200_000


def _jsonl(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("src_small"))
    return out, local_data.build_corpus(out, kind="stdlib_src", max_chars=SMALL_CHARS)


def test_source_corpus_is_whole_files_with_disjoint_splits(small):
    out, manifest = small
    assert set(os.listdir(out)) >= {"train.jsonl", "validation.jsonl", "tokenizer", "MANIFEST.json"}
    with open(os.path.join(out, "MANIFEST.json")) as f:
        assert json.load(f) == manifest
    train, valid = _jsonl(os.path.join(out, "train.jsonl")), _jsonl(os.path.join(out, "validation.jsonl"))
    assert (len(train), len(valid)) == (manifest["train_docs"], manifest["validation_docs"]) and train and valid
    assert manifest["kind"] == "stdlib_src" and manifest["vocab_size"] == 2048 and manifest["max_chars"] == SMALL_CHARS
    assert sum(map(len, train)) + sum(map(len, valid)) >= SMALL_CHARS
    # validation = the files whose relative path hashes to 0 mod 20; each document is one whole file
    root = sysconfig.get_paths()["stdlib"]
    assert len(manifest["validation_files"]) == len(valid)
    for rel, text in zip(manifest["validation_files"], valid):
        assert local_data.is_validation_path(rel)
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            assert f.read() == text
    assert not set(train) & set(valid)
    files = dict(local_data.iter_stdlib_files(SMALL_CHARS))
    assert sorted(files.values()) == sorted(train + valid)
    assert all(not local_data.is_validation_path(rel) for rel, text in files.items() if text in set(train))
    assert not any(part in ("test", "tests", "site-packages") for rel in files for part in rel.split("/"))


def test_build_is_deterministic_and_the_split_does_not_depend_on_max_chars(small, tmp_path):
    out, manifest = small
    again = local_data.build_corpus(str(tmp_path / "again"), max_chars=SMALL_CHARS)
    assert again["fingerprint"] == manifest["fingerprint"]
    with open(os.path.join(out, "train.jsonl"), "rb") as a, open(tmp_path / "again" / "train.jsonl", "rb") as b:
        assert a.read() == b.read()
    # a larger corpus extends the smaller one's training files, in the same order (the split is by path)
    bigger = [rel for rel, _ in local_data.iter_stdlib_files(3 * SMALL_CHARS) if not local_data.is_validation_path(rel)]
    smaller = [rel for rel, _ in local_data.iter_stdlib_files(SMALL_CHARS) if not local_data.is_validation_path(rel)]
    assert len(bigger) > len(smaller) and bigger[: len(smaller)] == smaller


def test_a_tiny_corpus_still_has_a_validation_file(tmp_path):
    manifest = local_data.build_corpus(str(tmp_path / "tiny"), max_chars=5_000)
    assert manifest["validation_docs"] >= 1 and manifest["train_docs"] >= 1


def test_kinds_and_directory_rule():
    assert local_data.corpus_kind_for_dir("data_cache/stdlib_src") == "stdlib_src"
    assert local_data.corpus_kind_for_dir("data_cache/stdlib_docs/") == "stdlib_docs"
    assert local_data.corpus_kind_for_dir("/tmp/anything") == "stdlib_src"
    with pytest.raises(ValueError, match="kind"):
        local_data.build_corpus("/nonexistent/never", kind="wikipedia")


def test_source_corpus_is_large_enough_for_every_config(tmp_path):
    """Tokens in the full source corpus (estimated from an evenly strided 1 M-character sample with the corpus'
    own tokenizer) against what each config consumes: num_train_steps x batch x seq_len, over `epoch` passes."""
    from transformers import AutoTokenizer

    manifest = local_data.build_corpus(str(tmp_path / "src"), kind="stdlib_src")
    assert manifest["train_chars"] + manifest["validation_chars"] > 10_000_000
    train = _jsonl(str(tmp_path / "src" / "train.jsonl"))
    sample = local_data.tokenizer_sample(train, 1_000_000)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "src" / "tokenizer"))
    sample_tokens = sum(len(ids) for ids in tok(sample, add_special_tokens=False)["input_ids"])
    train_tokens = manifest["train_chars"] * sample_tokens / sum(map(len, sample))
    for path in sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))):
        with open(path) as f:
            cfg = yaml.safe_load(f)
        needed = cfg["trainer"]["num_train_steps"] * cfg["trainer"]["train_batch_size"] * cfg["model"]["seq_len"]
        available = train_tokens * max(1, cfg.get("epoch", 0))
        assert available > 1.2 * needed, (os.path.basename(path), available, needed)


def test_runs_started_together_build_the_corpus_and_each_cache_once(small, tmp_path, monkeypatch):
    """Two training runs starting at once on a fresh checkout (a study's parallel runs; two CLIs) both call
    ensure_local_data: each thing is built once, under a lock, and the second run waits for it and reads it whole.
    The builders are slowed down so that, without the lock, both threads would be inside them at once."""
    import shutil
    import threading
    import time

    from transformers import AutoTokenizer

    src, _ = small
    fresh = tmp_path / "stdlib_src"
    calls = {"corpus": 0, "cache": 0}
    real_prebuild = local_data.prebuild_cache

    def slow_build_corpus(out_dir, kind):
        calls["corpus"] += 1
        time.sleep(0.5)
        os.makedirs(out_dir, exist_ok=True)
        for name in ("train.jsonl", "validation.jsonl"):
            shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
        shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(out_dir, "tokenizer"))

    def slow_prebuild(cache_dir, urls, tokenizer, enforce_eos=True):
        calls["cache"] += 1
        time.sleep(0.5)
        return real_prebuild(cache_dir, urls, tokenizer, enforce_eos=enforce_eos)

    monkeypatch.setattr(local_data, "build_corpus", slow_build_corpus)
    monkeypatch.setattr(local_data, "prebuild_cache", slow_prebuild)

    class DataConfig:  # the fields of Levanter's data config that ensure_local_data reads
        tokenizer = str(fresh / "tokenizer")
        train_urls = [str(fresh / "train.jsonl")]
        validation_urls = [str(fresh / "validation.jsonl")]
        cache_dir = str(fresh / "cache")
        enforce_eos = True

        @property
        def the_tokenizer(self):
            return AutoTokenizer.from_pretrained(self.tokenizer)

    start = threading.Barrier(2)
    errors = []

    def run():
        try:
            start.wait()
            local_data.ensure_local_data(DataConfig())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert calls == {"corpus": 1, "cache": 2}  # the corpus once, each split's cache once
    for split in ("train", "validation"):
        assert local_data._cache_is_complete(str(fresh / "cache" / split))
