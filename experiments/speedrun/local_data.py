"""Small real-text corpora and a BPE tokenizer built locally from the Python standard library, with no downloads.

Two kinds, both read from the ``.py`` files of the standard library that ships with the interpreter (nothing is
imported or executed), so every machine with Python can rebuild them; test directories, ``site-packages`` and
``lib2to3`` are skipped:

- ``stdlib_src`` (the default, what ``configs/speedrun/*.yaml`` train on): one document per source file, the
  file's full text, byte-identical duplicates dropped, files in a fixed order (sorted by a hash of their path
  relative to the stdlib root, so a ``max_chars`` prefix samples the whole library). A file goes to validation
  when ``sha1(relative path) % 20 == 0``, so no file is in both splits and the split does not depend on
  ``max_chars``. Python 3.11: 650 files, 11.8 M characters, about 3.9 M tokens
  with the 2048-token tokenizer (about 1900 steps of ``tiny_cpu.yaml``).
- ``stdlib_docs``: the docstrings of modules, classes and functions (read with ``ast``), one per document, every
  20th (by a stable hash of its text) held out; about 1.7 M characters (264 steps of ``tiny_cpu.yaml``).

Layout of a corpus directory (default ``data_cache/stdlib_src``, gitignored)::

    train.jsonl, validation.jsonl   {"text": ...} per line
    tokenizer/                       a Hugging Face tokenizer dir (byte-level BPE, vocab 2048 by default), trained
                                     on a bounded, evenly strided sample of the training documents
    cache/train, cache/validation    Levanter token caches, pre-built here without Ray
    MANIFEST.json                    kind, sizes, vocab, python version, split rule, content fingerprint

``build_corpus(out_dir, kind=..., max_chars=...)`` builds one (``max_chars`` stops adding documents once that
many characters are in, for small test corpora); ``python -m experiments.speedrun.local_data --kind stdlib_src``
does the same from the command line.

``ensure_local_data(data_config)`` is what the training CLI calls: if the config's tokenizer path does not exist
yet and names ``<dir>/tokenizer``, it builds the corpus in ``<dir>`` (kind ``stdlib_docs`` when ``<dir>`` is named
so, else ``stdlib_src``); then it pre-builds any missing Levanter cache for the config's local ``train_urls`` /
``validation_urls`` with Levanter's ``SerialCacheWriter`` (Levanter's own builder would start a local Ray cluster
just to tokenize a few MB). Each build holds an exclusive lock (``<corpus dir>.lock``, ``<cache dir>.lock``, beside
what it builds) and looks again once it has it, so runs started together (a study's parallel runs, two CLIs on a
fresh checkout) build each thing once and never read a half-built one.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
from typing import Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

CORPUS_KINDS = ("stdlib_src", "stdlib_docs")
DEFAULT_KIND = "stdlib_src"
DEFAULT_CORPUS_DIR = os.path.join("data_cache", DEFAULT_KIND)
DEFAULT_VOCAB_SIZE = 2048
# None: the whole standard library. The docstring corpus keeps its historical cap (it is smaller anyway).
DEFAULT_MAX_CHARS: dict[str, Optional[int]] = {"stdlib_src": None, "stdlib_docs": 6_000_000}
# The tokenizer is trained on at most this many characters of training text (an evenly strided sample of the
# documents), which keeps building the corpus to seconds whatever its size.
TOKENIZER_SAMPLE_CHARS = 4_000_000
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
MIN_DOC_CHARS = 40
_VALIDATION_EVERY = 20
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_sources() -> list[str]:
    """Relative paths (``/``-separated) of the standard library's ``.py`` files, sorted."""
    root = _stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.endswith(".py"):
                files.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(files)


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _file_order_key(rel_path: str) -> str:
    return hashlib.sha1(f"order:{rel_path}".encode("utf-8")).hexdigest()


def iter_stdlib_files(max_chars: Optional[int] = None) -> Iterator[tuple[str, str]]:
    """``(relative path, text)`` of the standard library's source files, byte-identical duplicates and near-empty
    files dropped, in a fixed pseudo-random order (sorted by a hash of the relative path, so a ``max_chars`` prefix
    is a sample of the whole library rather than its first directories).

    Stops once ``max_chars`` characters have been yielded; if no validation file (:func:`is_validation_path`) was
    among them, the next validation file in order is yielded too, so both splits are non-empty."""
    root = _stdlib_root()
    total = 0
    seen: set[str] = set()
    have_validation = False
    for rel in sorted(_stdlib_sources(), key=_file_order_key):
        if max_chars is not None and total >= max_chars and (have_validation or not is_validation_path(rel)):
            if have_validation:
                return
            continue
        text = _read_text(os.path.join(root, rel))
        if text is None or len(text.strip()) < MIN_DOC_CHARS:
            continue
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield rel, text
        total += len(text)
        have_validation = have_validation or is_validation_path(rel)


def iter_stdlib_docstrings(max_chars: Optional[int] = DEFAULT_MAX_CHARS["stdlib_docs"]) -> Iterator[str]:
    """Docstrings of the standard library's modules, classes and functions, in a deterministic order."""
    root = _stdlib_root()
    total = 0
    seen: set[str] = set()
    for rel in _stdlib_sources():
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(doc) < MIN_DOC_CHARS or doc in seen:
                continue
            seen.add(doc)
            yield doc
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return


def _hash_mod(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % _VALIDATION_EVERY


def is_validation_path(rel_path: str) -> bool:
    """The ``stdlib_src`` split: a file is held out when the sha1 of its relative path is 0 mod 20."""
    return _hash_mod(rel_path) == 0


def _is_validation(text: str) -> bool:  # the stdlib_docs split (by the docstring's text)
    return _hash_mod(text) == 0


def _write_jsonl(path: str, docs: Iterable[str]) -> int:
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def tokenizer_sample(docs: list[str], max_chars: int = TOKENIZER_SAMPLE_CHARS) -> list[str]:
    """An evenly strided, deterministic sample of ``docs`` holding about ``max_chars`` characters (all of them
    when they are fewer)."""
    total = sum(map(len, docs))
    if total <= max_chars:
        return list(docs)
    stride = -(-total // max_chars)  # ceil
    sample: list[str] = []
    chars = 0
    for d in docs[::stride]:
        sample.append(d)
        chars += len(d)
        if chars >= max_chars:
            break
    return sample


def train_tokenizer(docs: list[str], out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Byte-level BPE trained on ``docs``, saved as a Hugging Face tokenizer directory (AutoTokenizer reads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, model_max_length=1 << 30,
        model_input_names=["input_ids", "attention_mask"],
    )
    tmp = out_dir + ".tmp"
    hf.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return hf


def _fingerprint(items: Iterable[str]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(hashlib.sha1(item.encode("utf-8")).digest())
    return h.hexdigest()


def build_corpus(
    out_dir: str = DEFAULT_CORPUS_DIR,
    *,
    kind: str = DEFAULT_KIND,
    max_chars: Optional[int] = -1,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    tokenizer_sample_chars: int = TOKENIZER_SAMPLE_CHARS,
) -> dict:
    """Writes ``train.jsonl`` / ``validation.jsonl``, trains the tokenizer and writes ``MANIFEST.json`` in
    ``out_dir``; returns the manifest. Any old Levanter cache in ``out_dir/cache`` is removed (it belonged to the
    old text). ``max_chars``: stop adding documents once this many characters are in (None: no limit; the
    default -1 means the kind's default, ``DEFAULT_MAX_CHARS``)."""
    if kind not in CORPUS_KINDS:
        raise ValueError(f"kind must be one of {CORPUS_KINDS}, got {kind!r}")
    if max_chars == -1:
        max_chars = DEFAULT_MAX_CHARS[kind]
    os.makedirs(out_dir, exist_ok=True)
    manifest: dict = {"kind": kind}
    if kind == "stdlib_src":
        files = list(iter_stdlib_files(max_chars))
        train = [text for rel, text in files if not is_validation_path(rel)]
        valid = [text for rel, text in files if is_validation_path(rel)]
        manifest.update(
            source="Python standard library source files, one document per .py file (tests, site-packages and "
            "lib2to3 skipped; byte-identical duplicates dropped)",
            split="validation iff int(sha1(relative path), 16) % 20 == 0",
            validation_files=[rel for rel, _ in files if is_validation_path(rel)],
            fingerprint=_fingerprint(f"{rel}\0{text}" for rel, text in files),
        )
    else:
        docs = list(iter_stdlib_docstrings(max_chars))
        train = [d for d in docs if not _is_validation(d)]
        valid = [d for d in docs if _is_validation(d)]
        manifest.update(
            source="Python standard library docstrings (ast, no imports)",
            split="validation iff int(sha1(text), 16) % 20 == 0",
            fingerprint=_fingerprint(docs),
        )
    if not train or not valid:
        raise RuntimeError(
            f"corpus {kind!r} with max_chars={max_chars} has {len(train)} training and {len(valid)} validation "
            f"documents (stdlib at {_stdlib_root()}); both splits need at least one"
        )
    cache = os.path.join(out_dir, "cache")
    if os.path.exists(cache):
        shutil.rmtree(cache)
    _write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    _write_jsonl(os.path.join(out_dir, "validation.jsonl"), valid)
    sample = tokenizer_sample(train, tokenizer_sample_chars)
    train_tokenizer(sample, os.path.join(out_dir, "tokenizer"), vocab_size)
    manifest = {
        **manifest,
        "python": sys.version.split()[0],
        "max_chars": max_chars,
        "train_docs": len(train),
        "validation_docs": len(valid),
        "train_chars": sum(map(len, train)),
        "validation_chars": sum(map(len, valid)),
        "vocab_size": vocab_size,
        "tokenizer_sample_docs": len(sample),
        "tokenizer_sample_chars": sum(map(len, sample)),
    }
    with open(os.path.join(out_dir, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    logger.info("built %s corpus in %s: %d train / %d validation documents, %d characters", kind, out_dir,
                manifest["train_docs"], manifest["validation_docs"],
                manifest["train_chars"] + manifest["validation_chars"])
    return manifest


def corpus_kind_for_dir(corpus_dir: str) -> str:
    """The kind ``ensure_local_data`` builds in a directory: ``stdlib_docs`` if it is named so, else ``stdlib_src``."""
    return "stdlib_docs" if os.path.basename(os.path.normpath(corpus_dir)) == "stdlib_docs" else DEFAULT_KIND


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _read_jsonl_texts(urls: Iterable[str], text_key: str = "text") -> Iterator[str]:
    for url in urls:
        path = url[len("file://") :] if url.startswith("file://") else url
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)[text_key]


def prebuild_cache(cache_dir: str, urls: list[str], tokenizer, *, enforce_eos: bool = True, batch: int = 64) -> int:
    """Tokenizes local jsonl ``urls`` into a Levanter TreeCache at ``cache_dir`` without Ray. Returns rows."""
    from levanter.data.text import preprocessor_for_format, TextLmDatasetFormat
    from levanter.store.cache import CacheMetadata, SerialCacheWriter

    processor = preprocessor_for_format(TextLmDatasetFormat(), tokenizer, enforce_bos=True, enforce_eos=enforce_eos)
    rows = 0
    with SerialCacheWriter(
        cache_dir, processor.output_exemplar, metadata=CacheMetadata(preprocessor_metadata=processor.metadata)
    ) as writer:
        pending: list[dict] = []
        for text in _read_jsonl_texts(urls):
            pending.append({"text": text})
            if len(pending) == batch:
                writer.write_batch(processor(pending))
                rows += len(pending)
                pending = []
        if pending:
            writer.write_batch(processor(pending))
            rows += len(pending)
    return rows


def _cache_is_complete(cache_dir: str) -> bool:
    from levanter.store.cache import CacheLedger

    try:
        return CacheLedger.load(cache_dir).is_finished
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _exclusive(path: str):
    """Holds an exclusive advisory lock on ``<path>.lock`` (created beside ``path``) for the body: another process
    or thread building the same thing waits, then finds it built."""
    path = os.path.normpath(os.path.abspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_local_data(data_config) -> None:
    """Makes a Levanter data config that points at local files usable offline (see module docstring)."""
    tok_path = getattr(data_config, "tokenizer", None)
    if isinstance(tok_path, str) and _is_local(tok_path) and not os.path.exists(tok_path):
        if os.path.basename(os.path.normpath(tok_path)) == "tokenizer":
            corpus_dir = os.path.dirname(os.path.normpath(tok_path)) or "."
            with _exclusive(corpus_dir):
                if not os.path.exists(tok_path):  # a run started together with this one may have built it
                    kind = corpus_kind_for_dir(corpus_dir)
                    logger.info("local tokenizer %s missing: building the %s corpus in %s", tok_path, kind,
                                corpus_dir)
                    print(f"building the local {kind} corpus and tokenizer in {corpus_dir} (first use)", flush=True)
                    build_corpus(corpus_dir, kind=kind)
    cache_root = getattr(data_config, "cache_dir", None)
    if cache_root is None or not _is_local(cache_root):
        return
    splits = {"train": list(getattr(data_config, "train_urls", ()) or ()),
              "validation": list(getattr(data_config, "validation_urls", ()) or ())}
    for split, urls in splits.items():
        if not urls or not all(_is_local(u) for u in urls):
            continue
        cache_dir = os.path.join(cache_root, split)
        if _cache_is_complete(cache_dir):
            continue
        missing = [u for u in urls if not os.path.exists(u.replace("file://", ""))]
        if missing:
            raise FileNotFoundError(f"data.{split}_urls not found: {missing}")
        with _exclusive(cache_dir):
            if _cache_is_complete(cache_dir):  # built by a run started together with this one
                continue
            tokenizer = data_config.the_tokenizer
            if os.path.exists(cache_dir):
                shutil.rmtree(cache_dir)
            rows = prebuild_cache(cache_dir, urls, tokenizer, enforce_eos=getattr(data_config, "enforce_eos", True))
            logger.info("pre-built Levanter cache %s (%d documents)", cache_dir, rows)


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default=DEFAULT_KIND, choices=CORPUS_KINDS)
    ap.add_argument("--out_dir", default=None, help="default: data_cache/<kind>")
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--max_chars", type=int, default=-1, help="stop after this many characters (default: the kind's)")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or os.path.join("data_cache", args.kind)
    manifest = build_corpus(out_dir, kind=args.kind, vocab_size=args.vocab_size, max_chars=args.max_chars)
    manifest.pop("validation_files", None)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
