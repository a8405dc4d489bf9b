"""Write each data type as Lhotse Shar shards to a local folder or S3, with a manifest of shards, counts and hours.

Layout under the output URI (one folder per data type, Lhotse Shar file names):

    manifest.json
    text/cuts.000000.jsonl.gz
    asr_ast/cuts.000000.jsonl.gz   asr_ast/recording.000000.tar
    ...

`manifest.json` is written last, in one put: a reader that finds it finds every shard it lists complete, and a
half-written corpus (a crash mid-way) has no manifest and is refused with one clear error instead of being read
partially. Shards are made with lhotse's `SharWriter` in a small local staging folder and uploaded as each one
closes, so neither memory nor local disk ever holds more than one shard.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from lhotse.shar import SharWriter
from tqdm import tqdm

from data_ops.schema import DATA_TYPES, SchemaError
from data_ops.storage import S3Storage, Storage, StorageError, open_storage

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A shard folder has no usable manifest; the message names the location."""


@dataclass
class ShardInfo:
    cuts: str  # path of the cuts JSONL relative to the corpus root
    recording: str | None  # path of the audio tar, None for text-only shards
    num_cuts: int
    seconds: float


@dataclass
class TypeInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    tasks: dict[str, int] = field(default_factory=dict)

    @property
    def num_cuts(self) -> int:
        return sum(s.num_cuts for s in self.shards)

    @property
    def hours(self) -> float:
        return sum(s.seconds for s in self.shards) / 3600.0


@dataclass
class CorpusManifest:
    types: dict[str, TypeInfo]
    sampling_rate: int = 16000

    def to_json(self) -> str:
        return json.dumps({
            "version": MANIFEST_VERSION,
            "sampling_rate": self.sampling_rate,
            "types": {
                name: {"num_cuts": t.num_cuts, "hours": round(t.hours, 6), "tasks": t.tasks,
                       "shards": [asdict(s) for s in t.shards]}
                for name, t in self.types.items()
            },
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> "CorpusManifest":
        try:
            obj = json.loads(text)
            if obj.get("version") != MANIFEST_VERSION:
                raise ManifestError(f"{where}: manifest version {obj.get('version')!r}, expected {MANIFEST_VERSION}")
            types = {
                name: TypeInfo(shards=[ShardInfo(**s) for s in t["shards"]], tasks=dict(t.get("tasks", {})))
                for name, t in obj["types"].items()
            }
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{where}: manifest is malformed ({e})") from e
        return cls(types=types, sampling_rate=int(obj.get("sampling_rate", 16000)))

    def summary(self) -> str:
        return ", ".join(f"{n}: {t.num_cuts} cuts / {t.hours:.2f} h / {len(t.shards)} shards"
                         for n, t in self.types.items())


def read_manifest(uri: str, endpoint_url: str | None = None) -> CorpusManifest:
    """The manifest of a shard folder; `ManifestError` if there is none (not a corpus, or its writer crashed)."""
    storage = open_storage(uri, endpoint_url)
    where = f"{storage.uri}/{MANIFEST}"
    try:
        with storage.open_read(MANIFEST) as f:
            text = f.read().decode("utf-8")
    except StorageError as e:
        raise ManifestError(
            f"{where} not found: {uri} is not a corpus written by data_ops.shards (or its writer did not finish); "
            "write shards with `python -m jobs.data ...`"
        ) from e
    return CorpusManifest.from_json(text, where)


def known_manifest(uri: str, endpoint_url: str | None = None, known: dict | None = None) -> CorpusManifest:
    """The manifest of `uri` from `known` (by URI: manifests a caller has read already, e.g. a training run's data
    check), else read now."""
    return (known or {}).get(uri) or read_manifest(uri, endpoint_url)


class ShardWriter:
    """Stream cuts of each data type into Shar shards at `out_uri`; `close()` writes the manifest.

    Usage:
        with ShardWriter("s3://bucket/corpus", shard_size=500) as w:
            w.write("asr_ast", asr_cuts)
            w.write("asr_ast", ast_cuts)  # appends shards to the same type
            w.write("text", text_cuts)
    """

    def __init__(self, out_uri: str, *, shard_size: int = 1000, audio_format: str = "flac",
                 endpoint_url: str | None = None, progress: bool = True):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.storage: Storage = open_storage(out_uri, endpoint_url)
        if isinstance(self.storage, S3Storage):
            self.storage.ensure_bucket()
        self.shard_size = shard_size
        self.audio_format = audio_format
        self.progress = progress
        self.manifest = CorpusManifest(types={})

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:  # a failed write leaves no manifest, so nobody reads half a corpus
            self.close()

    def write(self, data_type: str, cuts: Iterable) -> TypeInfo:
        if data_type not in DATA_TYPES:
            raise SchemaError(f"data_type must be one of {DATA_TYPES}, got {data_type!r}")
        info = self.manifest.types.setdefault(data_type, TypeInfo())
        chunk: list = []
        bar = tqdm(desc=f"shards {data_type}", unit="cut", disable=not self.progress)
        for cut in cuts:
            if cut.custom.get("data_type") != data_type:
                raise SchemaError(f"cut {cut.id}: data_type {cut.custom.get('data_type')!r} written as {data_type!r}")
            chunk.append(cut)
            if len(chunk) == self.shard_size:
                self._flush(data_type, info, chunk)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            self._flush(data_type, info, chunk)
            bar.update(len(chunk))
        bar.close()
        return info

    def _flush(self, data_type: str, info: TypeInfo, chunk: list) -> None:
        index = len(info.shards)
        has_audio = any(c.has_recording for c in chunk)
        fields = {"recording": self.audio_format} if has_audio else {}
        with tempfile.TemporaryDirectory(prefix="vtb-shard-") as tmp:
            with SharWriter(tmp, fields=fields, shard_size=None) as w:
                for cut in chunk:
                    w.write(cut)
            cuts_rel = f"{data_type}/cuts.{index:06d}.jsonl.gz"
            rec_rel = f"{data_type}/recording.{index:06d}.tar" if has_audio else None
            # audio first: a cuts file never points at audio that is not uploaded yet
            if rec_rel:
                self.storage.put_file(Path(tmp) / "recording.tar", rec_rel)
            self.storage.put_file(Path(tmp) / "cuts.jsonl.gz", cuts_rel)
        info.shards.append(ShardInfo(cuts=cuts_rel, recording=rec_rel, num_cuts=len(chunk),
                                     seconds=round(sum(c.duration for c in chunk), 6)))
        tasks = Counter(info.tasks)
        tasks.update(str(c.custom.get("task")) for c in chunk)
        info.tasks = dict(tasks)

    def close(self) -> CorpusManifest:
        self.storage.put_bytes(self.manifest.to_json().encode("utf-8"), MANIFEST)
        return self.manifest
