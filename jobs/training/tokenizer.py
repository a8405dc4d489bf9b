"""The offline tokenizer for LMs that name none (tiny / random-init LMs), and its transport to Ray workers.

Workers get the tokenizer as a dict of file texts in the train loop config rather than a path: they may run on
other nodes that do not share the driver's disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

# Enough text per data type for a vocabulary of a few thousand tokens, read in seconds.
ROWS_PER_TYPE = 2000


def corpus_texts(uris: Sequence[str], endpoint_url: str | None = None, rows_per_type: int = ROWS_PER_TYPE,
                 manifests: dict | None = None) -> list[str]:
    """The text parts of up to `rows_per_type` conversations of every data type of every corpus.

    Every type, not only the ones a recipe samples: a text-only recipe (the ablation's text LM) must still get a
    vocabulary that covers the transcripts and translations its LM will later be trained to write, as a real LM's
    tokenizer covers the languages it will be asked about; otherwise those words fall apart into single letters
    and transcription becomes spelling. `manifests` (by URI): the corpora's, where the caller has read them.
    """
    from data_ops.shar_datasource import iter_cut_dicts
    from data_ops.shards import known_manifest

    texts: list[str] = []
    for uri in dict.fromkeys(uris):
        manifest = known_manifest(uri, endpoint_url, manifests)
        for dtype in manifest.types:
            for i, cut in enumerate(iter_cut_dicts(uri, dtype, endpoint_url=endpoint_url, manifest=manifest)):
                if i >= rows_per_type:
                    break
                for turn in cut["custom"]["conversation"]["turns"]:
                    texts += [p.get("text", "") for p in turn["parts"] if p.get("type") == "text"]
    return texts


def corpus_tokenizer_files(uris: Sequence[str], vocab_size: int, endpoint_url: str | None = None,
                           manifests: dict | None = None) -> dict[str, str]:
    from models.tokenizer import build_tiny_tokenizer

    texts = corpus_texts(uris, endpoint_url, manifests=manifests)
    return tokenizer_files(build_tiny_tokenizer(texts, vocab_size=vocab_size))


def tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_text() for p in Path(d).iterdir() if p.is_file()}


def load_tokenizer(files: dict[str, str] | None):
    """The tokenizer written by `tokenizer_files` (None for None)."""
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:  # AutoTokenizer reads the files at load: the folder can go
        for name, text in files.items():
            (Path(d) / name).write_text(text)
        return AutoTokenizer.from_pretrained(d)
