"""A small real-text corpus and a BPE tokenizer built locally, with no downloads.

The text is the docstrings of the Python standard library that ships with the interpreter (read with ``ast``
from the ``.py`` sources: nothing is imported or executed), so every machine with Python can rebuild it. One
docstring is one document. Every 20th document (by a stable hash of its text) goes to validation.

Layout of a corpus directory (default ``data_cache/stdlib_docs``, gitignored)::

    train.jsonl, validation.jsonl   {"text": ...} per line
    tokenizer/                       a Hugging Face tokenizer dir (byte-level BPE, vocab 2048 by default)
    cache/train, cache/validation    Levanter token caches, pre-built here without Ray
    MANIFEST.json                    sizes, vocab, python version the text came from

``ensure_local_data(data_config)`` is what the training entry point calls: if the config's tokenizer path
does not exist yet and names ``<dir>/tokenizer``, it builds the corpus in ``<dir>``; then it pre-builds any
missing Levanter cache for the config's local ``train_urls`` / ``validation_urls`` with Levanter's
``SerialCacheWriter`` (Levanter's own builder would start a local Ray cluster just to tokenize a few MB).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
from typing import Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_DIR = os.path.join("data_cache", "stdlib_docs")
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MAX_CHARS = 6_000_000
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
MIN_DOC_CHARS = 40
_VALIDATION_EVERY = 20
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _stdlib_sources() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                files.append(os.path.join(dirpath, name))
    return sorted(files)


def iter_stdlib_docstrings(max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[str]:
    """Docstrings of the standard library's modules, classes and functions, in a deterministic order."""
    total = 0
    seen: set[str] = set()
    for path in _stdlib_sources():
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
            if total >= max_chars:
                return


def _is_validation(text: str) -> bool:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % _VALIDATION_EVERY == 0


def _write_jsonl(path: str, docs: Iterable[str]) -> int:
    n = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


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
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return hf


def build_corpus(
    out_dir: str = DEFAULT_CORPUS_DIR, *, vocab_size: int = DEFAULT_VOCAB_SIZE, max_chars: int = DEFAULT_MAX_CHARS
) -> dict:
    """Writes train/validation jsonl and trains the tokenizer in ``out_dir``. Returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    docs = list(iter_stdlib_docstrings(max_chars))
    if len(docs) < 100:
        raise RuntimeError(f"only {len(docs)} docstrings found under {sysconfig.get_paths()['stdlib']}")
    train = [d for d in docs if not _is_validation(d)]
    valid = [d for d in docs if _is_validation(d)]
    _write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    _write_jsonl(os.path.join(out_dir, "validation.jsonl"), valid)
    train_tokenizer(train, os.path.join(out_dir, "tokenizer"), vocab_size)
    manifest = {
        "source": "Python standard library docstrings (ast, no imports)",
        "python": sys.version.split()[0],
        "train_docs": len(train),
        "validation_docs": len(valid),
        "train_chars": sum(map(len, train)),
        "validation_chars": sum(map(len, valid)),
        "vocab_size": vocab_size,
    }
    with open(os.path.join(out_dir, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    logger.info("built local corpus in %s: %s", out_dir, manifest)
    return manifest


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


def prebuild_cache(cache_dir: str, urls: list[str], tokenizer, *, enforce_eos: bool = True, batch: int = 256) -> int:
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


def ensure_local_data(data_config) -> None:
    """Makes a Levanter data config that points at local files usable offline (see module docstring)."""
    tok_path = getattr(data_config, "tokenizer", None)
    if isinstance(tok_path, str) and _is_local(tok_path) and not os.path.exists(tok_path):
        if os.path.basename(os.path.normpath(tok_path)) == "tokenizer":
            corpus_dir = os.path.dirname(os.path.normpath(tok_path)) or "."
            logger.info("local tokenizer %s missing: building the stdlib-docstring corpus in %s", tok_path, corpus_dir)
            build_corpus(corpus_dir)
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
        tokenizer = data_config.the_tokenizer
        if os.path.exists(cache_dir):
            import shutil

            shutil.rmtree(cache_dir)
        rows = prebuild_cache(cache_dir, urls, tokenizer, enforce_eos=getattr(data_config, "enforce_eos", True))
        logger.info("pre-built Levanter cache %s (%d documents)", cache_dir, rows)


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", default=DEFAULT_CORPUS_DIR)
    ap.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE)
    ap.add_argument("--max_chars", type=int, default=DEFAULT_MAX_CHARS)
    args = ap.parse_args(argv)
    print(json.dumps(build_corpus(args.out_dir, vocab_size=args.vocab_size, max_chars=args.max_chars), indent=2))


if __name__ == "__main__":
    main()
