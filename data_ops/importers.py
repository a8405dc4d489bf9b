"""Bring existing corpora into the conversation schema: ASR/AST corpora and multi-turn text SFT.

- ASR/AST: any Lhotse manifests (a recipe's recordings + supervisions, or a cuts manifest) or a plain table
  (CSV/TSV with a header: `audio_path, text[, translation, lang, target_lang]`). Every utterance becomes an ASR
  conversation, and one with a translation also an AST conversation, with the paper's fixed instructions (one per
  task and language, section 4.1):
      "Transcribe the content to [language], with punctuations and capitalizations."
      "Translate the [source] content to [target], with punctuations and capitalizations."
  The user turn is [audio, instruction] (context first, then the request), the assistant turn the target text.
- Text SFT: JSONL with OpenAI-style `messages` (`{"messages": [{"role": "user", "content": "..."}, ...]}`; content a
  string or a list of `{"type": "text", "text": ...}` parts) -> text-only conversations.

Importers skip bad items when given an `ImportReport` (counted, logged with file and line) and raise
`SchemaError` naming the file and line otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from lhotse import CutSet, MonoCut

from data_ops.schema import (SAMPLING_RATE, SchemaError, check_unicode, conversation_to_cut, iter_jsonl, load_audio_16k,
                             read_utf8)
from data_ops.storage import LocalStorage, Storage, is_remote, open_storage
from models.conversation import AudioPart, Conversation, TextPart, Turn

logger = logging.getLogger("vtblender.data")

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "pt": "Portuguese",
    "nl": "Dutch", "pl": "Polish", "ru": "Russian", "zh": "Chinese", "ja": "Japanese", "ko": "Korean",
}
_CODES = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}

ASR_INSTRUCTION = "Transcribe the content to {language}, with punctuations and capitalizations."
AST_INSTRUCTION = "Translate the {source} content to {target}, with punctuations and capitalizations."


def language_code(lang: str) -> str:
    """'en', 'EN', 'English', 'en-US' -> 'en'. Unknown languages are an error (the instruction names them)."""
    key = str(lang).strip().lower()
    code = key.split("-")[0].split("_")[0]
    if code in LANGUAGE_NAMES:
        return code
    if key in _CODES:
        return _CODES[key]
    raise SchemaError(f"unknown language {lang!r}; known: {sorted(LANGUAGE_NAMES)} (or their English names)")


def asr_instruction(lang: str) -> str:
    return ASR_INSTRUCTION.format(language=LANGUAGE_NAMES[language_code(lang)])


def ast_instruction(source: str, target: str) -> str:
    return AST_INSTRUCTION.format(source=LANGUAGE_NAMES[language_code(source)],
                                  target=LANGUAGE_NAMES[language_code(target)])


def asr_conversation(audio: np.ndarray, text: str, lang: str) -> Conversation:
    return Conversation([
        Turn("user", [AudioPart(audio, SAMPLING_RATE, transcript=text), TextPart(asr_instruction(lang))]),
        Turn.text("assistant", text),
    ])


def ast_conversation(audio: np.ndarray, text: str, translation: str, source: str, target: str) -> Conversation:
    return Conversation([
        Turn("user", [AudioPart(audio, SAMPLING_RATE, transcript=text), TextPart(ast_instruction(source, target))]),
        Turn.text("assistant", translation),
    ])


def speech_cuts(utt_id: str, audio: np.ndarray, text: str, lang: str, translation: str | None = None,
                target_lang: str | None = None) -> list[MonoCut]:
    """The ASR cut of one utterance, plus its AST cut when a translation is given."""
    if not isinstance(text, str) or (translation is not None and not isinstance(translation, str)):
        raise SchemaError(f"{utt_id}: the transcript and the translation must be text")
    if not text.strip():
        raise SchemaError(f"{utt_id}: empty transcript")
    src = language_code(lang)
    cuts = [conversation_to_cut(asr_conversation(audio, text, src), cut_id=f"{utt_id}-asr-{src}",
                                data_type="asr_ast", task="asr", langs=[src])]
    if translation is not None and translation.strip():
        if not target_lang:
            raise SchemaError(f"{utt_id}: a translation needs its target language (target_lang)")
        tgt = language_code(target_lang)
        cuts.append(conversation_to_cut(ast_conversation(audio, text, translation, src, tgt),
                                        cut_id=f"{utt_id}-ast-{src}-{tgt}", data_type="asr_ast", task="ast",
                                        langs=[src, tgt]))
    return cuts


@dataclasses.dataclass
class ImportReport:
    """What an import kept and skipped; `skipped` holds one message per skipped item."""

    kept: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)

    def skip(self, message: str) -> None:
        logger.warning("skipped: %s", message)
        self.skipped.append(message)


def _guard(items: Iterator[list[MonoCut] | SchemaError], report: ImportReport | None) -> Iterator[MonoCut]:
    """Items arrive as their cuts or as the SchemaError that stopped them: skip those (report given) or raise."""
    for item in items:
        if isinstance(item, SchemaError):
            if report is None:
                raise item
            report.skip(str(item))
            continue
        if report is not None:
            report.kept += len(item)
        yield from item


def read_audio_table(path: str | Path, *, lang: str | None = None, target_lang: str | None = None,
                     report: ImportReport | None = None) -> Iterator[MonoCut]:
    """ASR (and AST) cuts from a CSV/TSV table with a header row. Relative audio paths resolve against the table's
    folder; `lang`/`target_lang` give defaults for rows without those columns."""
    path = Path(path)
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","

    def items() -> Iterator[list[MonoCut] | SchemaError]:
        with io.StringIO(read_utf8(path), newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            missing = {"audio_path", "text"} - set(reader.fieldnames or [])
            if missing:
                raise SchemaError(f"{path}: header needs columns audio_path and text; missing {sorted(missing)}")
            for lineno, row in enumerate(reader, 2):
                where = f"{path}:{lineno}"
                try:
                    if row["audio_path"] is None:  # a row with fewer fields than the header
                        raise SchemaError("no audio_path in this row")
                    audio_path = Path(row["audio_path"])
                    audio_path = audio_path if audio_path.is_absolute() else path.parent / audio_path
                    row_lang = row.get("lang") or lang
                    if not row_lang:
                        raise SchemaError("no language: add a 'lang' column or pass lang=")
                    audio = _load(audio_path)
                    yield speech_cuts(f"{path.stem}-{lineno}", audio, row["text"] or "", row_lang,
                                      row.get("translation"), row.get("target_lang") or target_lang)
                except SchemaError as e:
                    yield SchemaError(f"{where}: {e}")

    return _guard(items(), report)


def _load(audio_path: Path) -> np.ndarray:
    if not audio_path.is_file():
        raise SchemaError(f"audio file {audio_path} does not exist")
    try:
        audio = load_audio_16k(audio_path)
    except Exception as e:
        raise SchemaError(f"audio file {audio_path} cannot be decoded: {e}") from e
    if audio.size == 0:
        raise SchemaError(f"audio file {audio_path} is empty")
    return audio


def read_lhotse_manifests(cuts: CutSet | str | Path | None = None, *, recordings: str | Path | None = None,
                          supervisions: str | Path | None = None, lang: str | None = None,
                          target_lang: str | None = None, translation_key: str = "translation",
                          report: ImportReport | None = None) -> Iterator[MonoCut]:
    """ASR (and AST) cuts from Lhotse manifests: a CutSet (or its path), or a recipe's recordings + supervisions.

    Every supervision becomes one utterance (`trim_to_supervisions`); its language comes from
    `supervision.language` (codes or English names) or `lang`; a translation from
    `supervision.custom[translation_key]`, its language from `supervision.custom["target_lang"]` or `target_lang`.
    """
    if cuts is None:
        if recordings is None or supervisions is None:
            raise SchemaError("give a cuts manifest, or both recordings and supervisions manifests")
        cuts = CutSet.from_manifests(recordings=_load_manifest(recordings), supervisions=_load_manifest(supervisions))
    elif not isinstance(cuts, CutSet):
        cuts = CutSet.from_file(cuts)
    utterances = cuts.trim_to_supervisions(keep_overlapping=False)

    def items() -> Iterator[list[MonoCut] | SchemaError]:
        for cut in utterances:
            sup = cut.supervisions[0]
            try:
                try:
                    audio = cut.resample(SAMPLING_RATE).load_audio().mean(axis=0).astype(np.float32)
                except Exception as e:
                    raise SchemaError(f"{cut.id}: audio cannot be loaded: {e}") from e
                custom = sup.custom or {}
                sup_lang = sup.language or lang
                if not sup_lang:
                    raise SchemaError(f"{cut.id}: supervision has no language; pass lang=")
                yield speech_cuts(cut.id, audio, sup.text or "", sup_lang, custom.get(translation_key),
                                  custom.get("target_lang") or target_lang)
            except SchemaError as e:
                yield e

    return _guard(items(), report)


def _load_manifest(path):
    from lhotse import load_manifest

    return load_manifest(path)


def text_sft_conversation(messages: list, where: str) -> Conversation:
    """OpenAI-style `messages` -> text-only Conversation (system first, at least one assistant turn)."""
    if not isinstance(messages, list) or not messages:
        raise SchemaError(f"{where}: needs a non-empty 'messages' list")
    turns = []
    for j, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise SchemaError(f"{where}: message {j} role must be system, user or assistant, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text":
                    raise SchemaError(f"{where}: message {j} has a non-text content part; text SFT is text only")
                if not isinstance(p.get("text"), str):
                    raise SchemaError(f"{where}: message {j} has a text part whose text is not a string")
                texts.append(p["text"])
            content = "".join(texts)
        if not isinstance(content, str) or not content.strip():
            raise SchemaError(f"{where}: message {j} has empty or missing content")
        check_unicode(content, f"{where}: message {j}")
        if role == "system" and j != 0:
            raise SchemaError(f"{where}: a system message may only come first")
        turns.append(Turn.text(role, content))
    if not any(t.role == "assistant" for t in turns):
        raise SchemaError(f"{where}: no assistant message to learn from")
    return Conversation(turns)


def read_messages_jsonl(path: str | Path, *, lang: str = "en", report: ImportReport | None = None) -> Iterator[MonoCut]:
    """Text-only SFT cuts from a JSONL file of `{"messages": [...]}` objects (an optional "id" is kept)."""
    path = Path(path)

    def items() -> Iterator[list[MonoCut] | SchemaError]:
        for where, obj in iter_jsonl(path):
            try:
                if isinstance(obj, SchemaError):
                    raise obj
                conv = text_sft_conversation(obj.get("messages"), where)
                cut_id = str(obj.get("id") or f"{path.stem}-{where.rsplit(':', 1)[1]}")
                yield [conversation_to_cut(conv, cut_id=cut_id, data_type="text", task="text", langs=[lang])]
            except SchemaError as e:
                yield e

    return _guard(items(), report)


def write_messages_jsonl(conversations: Iterable[tuple[str, Conversation]], path: str | Path) -> int:
    """The inverse for text-only conversations: (id, conversation) pairs -> OpenAI-style JSONL."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for cut_id, conv in conversations:
            if conv.audio_parts:
                raise SchemaError(f"{cut_id}: has audio; messages JSONL holds text-only conversations")
            messages = [{"role": t.role, "content": t.text_only} for t in conv.turns]
            f.write(json.dumps({"id": cut_id, "messages": messages}, ensure_ascii=False) + "\n")
            n += 1
    return n


# -- Hugging Face datasets --------------------------------------------------------------------------------------
# Column names of common speech datasets as the Hub holds them, so that `layout="commonvoice"` is all a user types.
HF_LAYOUTS = {
    "commonvoice": {"text": "sentence", "lang": "locale", "id": "path"},
    "fleurs": {"text": "transcription", "lang": None, "id": "id"},
    "librispeech": {"text": "text", "lang": None, "id": "id"},
    "covost2": {"text": "sentence", "translation": "translation", "lang": None, "id": "id"},
}


def _hf_table_files(uri: str, endpoint_url: str | None) -> tuple[Storage, list[str]]:
    """(storage at the dataset's folder, its data files relative to it): parquet (the Hub's format) or arrow
    (`Dataset.save_to_disk`), in a folder or one file, on disk or object storage (`s3://...`)."""
    if uri.endswith((".parquet", ".arrow")) or (not is_remote(uri) and Path(uri).is_file()):
        folder, _, name = uri.rstrip("/").rpartition("/")
        storage = open_storage(folder or ".", endpoint_url)
        if not storage.exists(name):
            raise SchemaError(f"{uri} does not exist")
        return storage, [name]
    storage = open_storage(uri, endpoint_url)
    names = storage.list("")
    files = [n for n in names if n.endswith(".parquet")] or [
        n for n in names if n.endswith(".arrow") and not n.rpartition("/")[2].startswith("cache-")]
    if not files:
        raise SchemaError(f"{uri}: no .parquet or .arrow files (a Hugging Face dataset folder or one of its files)")
    return storage, files


@contextlib.contextmanager
def _local_file(storage: Storage, rel: str) -> Iterator[Path]:
    """The file itself on disk; an object is copied to a temporary file first (parquet and arrow readers seek)."""
    if isinstance(storage, LocalStorage):
        yield storage.root / rel
        return
    with tempfile.NamedTemporaryFile(suffix=Path(rel).suffix) as tmp:
        with storage.open_read(rel) as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        yield Path(tmp.name)


def _hf_batches(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=64)
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)  # what `save_to_disk` writes
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _hf_audio(value, storage: Storage, folder: str) -> np.ndarray:
    """An `Audio` column's value: {"bytes": ..., "path": ...} (bytes win; a relative path is relative to the data
    file's folder, in the same storage)."""
    if isinstance(value, dict) and value.get("bytes"):
        return _decoded(value["bytes"], "bytes")
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        raise SchemaError("the audio column holds neither bytes nor a path")
    if Path(path).is_absolute():
        return _load(Path(path))
    rel = posixpath.normpath(posixpath.join(folder, path))
    if isinstance(storage, LocalStorage):
        return _load(storage.root / rel)
    if not storage.exists(rel):
        raise SchemaError(f"audio file {storage.uri}/{rel} does not exist")
    with storage.open_read(rel) as f:  # a store that stays away raises StorageUnavailable: not a bad row
        data = f.read()
    return _decoded(data, f"{storage.uri}/{rel}")


def _hf_rows(uri: str, needed: set[str], hint: str = "", endpoint_url: str | None = None
             ) -> Iterator[tuple[Storage, str, str, int, dict]]:
    """(storage, data file, "file:row", row number, row) for every row of a dataset folder or file; SchemaError
    naming the file when it lacks a needed column."""
    storage, files = _hf_table_files(str(uri), endpoint_url)
    for rel in files:
        where_file = f"{storage.uri}/{rel}"
        row_no = 0
        with _local_file(storage, rel) as local:
            for batch in _hf_batches(local):
                missing = needed - set(batch.schema.names)
                if missing:
                    raise SchemaError(f"{where_file}: no column(s) {sorted(missing)}; it has "
                                      f"{sorted(batch.schema.names)}{hint}")
                for row in batch.to_pylist():
                    yield storage, rel, f"{where_file}:{row_no}", row_no, row
                    row_no += 1


def read_hf_speech_dataset(path: str | Path, *, layout: str | None = None, audio_column: str = "audio",
                           text_column: str | None = None, translation_column: str | None = None,
                           lang_column: str | None = None, id_column: str | None = None, lang: str | None = None,
                           target_lang: str | None = None, report: ImportReport | None = None,
                           endpoint_url: str | None = None) -> Iterator[MonoCut]:
    """ASR (and AST) cuts from a Hugging Face dataset on disk: parquet files (as on the Hub) or arrow files
    (`save_to_disk`), in a folder or file on disk or object storage (`s3://...`, `endpoint_url` for S3-compatible
    stores), audio as bytes or paths in an `Audio` column. `layout` names a known dataset's columns
    (`HF_LAYOUTS`); explicit column arguments override it. Rows that cannot be used are skipped and named
    (file:row) with a report, else the first raises."""
    if layout and layout not in HF_LAYOUTS:
        raise SchemaError(f"unknown layout {layout!r}; known: {sorted(HF_LAYOUTS)}")
    cols = dict(HF_LAYOUTS[layout]) if layout else {"text": "text", "lang": None, "id": None}
    text_column = text_column or cols["text"]
    translation_column = translation_column or cols.get("translation")
    lang_column = lang_column or cols.get("lang")
    id_column = id_column or cols.get("id")

    def items() -> Iterator[list[MonoCut] | SchemaError]:
        hint = " (name them with audio_column / text_column, or pick a layout)"
        for storage, rel, where, row_no, row in _hf_rows(path, {audio_column, text_column}, hint, endpoint_url):
            try:
                row_lang = (row.get(lang_column) if lang_column else None) or lang
                if not row_lang:
                    raise SchemaError("no language: pass lang= or lang_column=")
                audio = _hf_audio(row[audio_column], storage, posixpath.dirname(rel))
                utt = str(row.get(id_column) or "") if id_column else ""
                utt_id = f"{Path(rel).stem}-{row_no}" + (f"-{Path(utt).stem}" if utt else "")
                translation = row.get(translation_column) if translation_column else None
                yield speech_cuts(utt_id, audio, row.get(text_column) or "", row_lang, translation, target_lang)
            except SchemaError as e:
                yield SchemaError(f"{where}: {e}")

    return _guard(items(), report)


def read_hf_text_dataset(path: str | Path, *, messages_column: str = "messages", lang: str = "en",
                         report: ImportReport | None = None, endpoint_url: str | None = None) -> Iterator[MonoCut]:
    """Text SFT cuts from a Hugging Face dataset (on disk or object storage) whose `messages_column` holds
    OpenAI-style messages."""

    def items() -> Iterator[list[MonoCut] | SchemaError]:
        for _, rel, where, row_no, row in _hf_rows(path, {messages_column}, endpoint_url=endpoint_url):
            try:
                conv = text_sft_conversation(row[messages_column], where)
                yield [conversation_to_cut(conv, cut_id=f"{Path(rel).stem}-{row_no}", data_type="text", task="text",
                                           langs=[lang])]
            except SchemaError as e:
                yield e

    return _guard(items(), report)


# -- NeMo tarred audio datasets ---------------------------------------------------------------------------------
def expand_nemo_shards(pattern: str) -> list[str]:
    """NeMo's shard patterns: `audio_{0..7}.tar` or `audio__OP_0..7_CL_.tar` -> the eight file names."""
    import re

    pattern = pattern.replace("_OP_", "{").replace("_CL_", "}")
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = int(m.group(1)), int(m.group(2))
    return [p for i in range(a, b + 1) for p in expand_nemo_shards(pattern[:m.start()] + str(i) + pattern[m.end():])]


def read_nemo_tarred(manifest: str | Path, tars: str, *, text_key: str = "text", lang: str | None = None,
                     target_lang: str | None = None, report: ImportReport | None = None) -> Iterator[MonoCut]:
    """ASR (and AST) cuts from a NeMo tarred audio dataset: a manifest (JSONL: `audio_filepath` naming a file inside
    the tars, the transcript under `text_key`, optional `source_lang`/`lang`, `target_lang` and, for translation,
    `answer` or `translation`) and its tar files (`tars`: NeMo's brace pattern, e.g. `audio_{0..7}.tar`; relative
    to the manifest's folder). Tars are streamed once each; entries whose audio no tar holds are skipped and named."""
    manifest = Path(manifest)
    entries: dict[str, list[tuple[str, dict]]] = {}
    bad: list[SchemaError] = []
    for where, obj in iter_jsonl(manifest):
        if isinstance(obj, SchemaError):
            bad.append(obj)
        elif not isinstance(obj.get("audio_filepath"), str) or not obj["audio_filepath"]:
            bad.append(SchemaError(f"{where}: no audio_filepath (a file name inside the tars)"))
        else:
            entries.setdefault(Path(obj["audio_filepath"]).name, []).append((where, obj))
    files = [Path(p) if Path(p).is_absolute() else manifest.parent / p for p in expand_nemo_shards(tars)]

    def items() -> Iterator[list[MonoCut] | SchemaError]:
        yield from bad
        seen: set[str] = set()
        for tar_path in files:
            if not tar_path.is_file():
                yield SchemaError(f"{tar_path}: tar file does not exist")
                continue
            try:
                for name, member_name, data in _tar_members(tar_path, set(entries)):
                    seen.add(name)
                    for where, obj in entries[name]:
                        try:
                            audio = _decoded(data, f"{tar_path.name}:{member_name}")
                            src = obj.get("source_lang") or obj.get("lang") or lang
                            if not src:
                                raise SchemaError("no language: add source_lang/lang to the manifest or pass lang=")
                            translation = obj.get("translation")
                            tgt = obj.get("target_lang") or target_lang
                            if translation is None and tgt and tgt != src and obj.get("answer"):
                                translation = obj["answer"]  # Canary's AST entries: the answer is the translation
                            utt = f"{manifest.stem}-{where.rsplit(':', 1)[1]}-{Path(name).stem}"
                            yield speech_cuts(utt, audio, str(obj.get(text_key) or ""), src, translation, tgt)
                        except SchemaError as e:
                            yield SchemaError(f"{where}: {e}")
            except tarfile.TarError as e:  # not a tar, or cut short: its entries not yet read are reported below
                yield SchemaError(f"{tar_path}: not a readable tar file ({e})")
        for name in sorted(set(entries) - seen):
            for where, _ in entries[name]:
                yield SchemaError(f"{where}: {name} is in no tar file of {tars}")

    return _guard(items(), report)


def _tar_members(tar_path: Path, wanted: set[str]) -> Iterator[tuple[str, str, bytes]]:
    """(file name, member name, bytes) of the tar's files whose name is in `wanted`, streamed: members in order,
    each read once, none held longer than its turn."""
    with tarfile.open(tar_path, "r|*") as tar:
        for member in tar:
            name = Path(member.name).name
            if member.isfile() and name in wanted:
                yield name, member.name, tar.extractfile(member).read()


def _decoded(data: bytes, where: str) -> np.ndarray:
    from models.audio import AudioDecodeError, decode_audio

    try:
        return decode_audio(data, SAMPLING_RATE)
    except AudioDecodeError as e:
        raise SchemaError(f"audio {where} cannot be decoded: {e}") from None


def read_lhotse_shar(in_dir: str | Path, *, lang: str | None = None, target_lang: str | None = None,
                     report: ImportReport | None = None) -> Iterator[MonoCut]:
    """ASR (and AST) cuts from a Lhotse Shar directory with supervisions (as NeMo's Lhotse dataloading writes and
    reads them): each supervision one utterance, as `read_lhotse_manifests`."""
    return read_lhotse_manifests(CutSet.from_shar(in_dir=str(in_dir)), lang=lang, target_lang=target_lang,
                                 report=report)
