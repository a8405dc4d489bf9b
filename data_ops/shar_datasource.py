"""Stream Shar shards written by `data_ops.shards` into Ray Data, one read task per shard.

Each row is one conversation, ready for the trainer:

    id, data_type, task, langs (JSON list), conversation (JSON, audio parts as "samples:START:END"),
    audio (float32 little-endian bytes of the cut's 16 kHz mono samples, null for text-only), num_samples,
    duration, shard (the shard's cuts path), index (position inside the shard), error (null for good rows)

Bad data never stops the stream: a missing shard, an unreadable cut line, audio that does not decode or is empty,
a cut whose conversation does not fit its audio — each becomes one *error row* (every other field but
`shard`/`index`/`id` empty, `error` saying what and where) and a log line naming the shard. Consumers drop error
rows and count them (`is_error_row`), so the count reaches the consumer's metrics without any global state.
A store that cannot be reached is not bad data: the storage layer retries and resumes each read, and when it
gives up, `StorageUnavailable` stops the stream (the job resumes from its checkpoint; no row is skipped).

Shard order is a permutation drawn from (seed, epoch); `plan_reads` also splits an epoch between training ranks
and takes `start`/`skip` per shard, so a resumed reader continues each shard exactly where it stopped (Ray Data
itself cannot resume an iterator mid-epoch).

Why our own reader instead of `lhotse.CutSet.from_shar`: lhotse's reader opens URLs with smart_open (no custom S3
endpoint from our config) and raises on the first bad item; here each shard must stream from boto3 and turn bad
items into counted rows. lhotse's tar pairing (`iterate_tarfile_pairwise`) and cut deserialization are reused.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import tarfile
from typing import Iterator

import numpy as np
import pyarrow as pa
from lhotse.serialization import deserialize_item
from lhotse.shar.readers.tar import iterate_tarfile_pairwise
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from data_ops.schema import SAMPLING_RATE, SchemaError, fill_conversation
from data_ops.shards import CorpusManifest, ManifestError, ShardInfo, TypeInfo, read_manifest
from data_ops.storage import Storage, StorageError, StorageUnavailable, open_storage
from models import audio as models_audio
from models.conversation import Conversation

logger = logging.getLogger("vtblender.data")

ROW_SCHEMA = pa.schema([
    ("id", pa.string()), ("data_type", pa.string()), ("task", pa.string()), ("langs", pa.string()),
    ("conversation", pa.string()), ("audio", pa.binary()), ("num_samples", pa.int64()),
    ("duration", pa.float64()), ("shard", pa.string()), ("index", pa.int64()), ("error", pa.string()),
])


def _error_row(shard: str, index: int, cut_id: str | None, message: str) -> dict:
    logger.warning("shard %s item %d%s: %s", shard, index, f" ({cut_id})" if cut_id else "", message)
    return {"id": cut_id, "data_type": None, "task": None, "langs": None, "conversation": None, "audio": None,
            "num_samples": 0, "duration": 0.0, "shard": shard, "index": index, "error": message}


def is_error_row(row: dict) -> bool:
    # In numpy/pandas batches a null string column may come back as NaN, not None.
    err = row.get("error")
    return isinstance(err, str) and err != ""


def decode_audio(data: bytes) -> np.ndarray:
    """A shard's audio file bytes -> mono float32 (S,) at the corpus rate. Raises ValueError (`AudioDecodeError`)
    on undecodable, empty or non-finite audio."""
    return models_audio.decode_audio(data, SAMPLING_RATE)


def _good_row(cut, data_type: str, audio: np.ndarray | None, shard: str, index: int) -> dict:
    custom = cut.custom or {}
    if "conversation" not in custom:
        raise SchemaError(f"cut {cut.id}: no 'conversation' in its custom fields; not written by this schema")
    fill_conversation(cut.id, custom["conversation"], audio)  # raises SchemaError if it does not fit the audio
    if custom.get("data_type") != data_type:
        raise SchemaError(f"cut {cut.id}: data_type {custom.get('data_type')!r} in the {data_type!r} folder")
    return {"id": cut.id, "data_type": data_type, "task": str(custom.get("task")),
            "langs": json.dumps(custom.get("langs")),
            "conversation": json.dumps(custom["conversation"]),
            "audio": None if audio is None else audio.astype("<f4").tobytes(),
            "num_samples": 0 if audio is None else len(audio),
            "duration": 0.0 if audio is None else len(audio) / SAMPLING_RATE,
            "shard": shard, "index": index, "error": None}


def iter_shard_rows(storage: Storage, shard: ShardInfo, data_type: str, start: int = 0, *,
                    skip: frozenset[int] = frozenset(), offset: int = 0, stride: int = 1,
                    name: str | None = None) -> Iterator[dict]:
    """Rows of one shard: those at index >= `start`, not in `skip`, with index % stride == offset. Other rows are
    read past, never decoded. `name` (default: the shard's cuts path) goes into each row's `shard` field."""
    name = name or shard.cuts
    try:
        cuts_stream = storage.open_read(shard.cuts)
        tar_stream = storage.open_read(shard.recording) if shard.recording else None
    except StorageUnavailable:
        raise  # the store, not the shard: the job stops and resumes from its checkpoint; nothing is skipped
    except StorageError as e:
        yield _error_row(name, start, None, f"missing shard: {e}; its {shard.num_cuts - start} cuts are skipped")
        return
    lines = gzip.open(cuts_stream, "rt", encoding="utf-8")
    tar = tarfile.open(fileobj=tar_stream, mode="r|*") if tar_stream is not None else None
    pairs = iterate_tarfile_pairwise(tar) if tar is not None else None
    index = -1
    try:
        for index, line in enumerate(lines):
            pair = None
            if pairs is not None:
                try:
                    pair = next(pairs)
                except StopIteration:
                    yield _error_row(name, index, None, "audio tar ends before the cuts file; rest of shard skipped")
                    return
            if index < start or index in skip or index % stride != offset:
                continue
            try:
                cut = deserialize_item(json.loads(line))
            except Exception as e:
                yield _error_row(name, index, None, f"unreadable cut line: {type(e).__name__}: {str(e)[:200]}")
                continue
            try:
                audio = None
                if pair is not None:
                    (data, data_path), _meta = pair
                    if data_path.stem != cut.id:
                        raise SchemaError(f"audio tar item {data_path.name} does not belong to cut {cut.id}")
                    if data_path.suffix != ".nodata":
                        audio = decode_audio(data)
                        expected = cut.recording.num_samples if cut.has_recording else None
                        at_rate = expected is not None and cut.recording.sampling_rate == SAMPLING_RATE
                        if at_rate and len(audio) != expected:
                            raise ValueError(f"audio has {len(audio)} samples, the cut says {expected}")
                yield _good_row(cut, data_type, audio, name, index)
            except (ValueError, SchemaError) as e:
                yield _error_row(name, index, cut.id, str(e))
    except StorageUnavailable:
        raise  # reads are retried and resumed in the storage layer; when that gives up, nothing is skipped
    except (OSError, EOFError, tarfile.TarError, RuntimeError) as e:
        # a truncated gzip or tar: the rest of this shard is unreadable, the stream goes on with the next shard
        yield _error_row(name, max(index, start), None, f"shard unreadable after item {index}: {type(e).__name__}: {e}")
    finally:
        lines.close()
        if tar is not None:
            tar.close()


def shard_order(shards: list[ShardInfo], seed: int, epoch: int) -> list[ShardInfo]:
    """Seeded per-epoch shuffle: every epoch a different order, the same on every machine for the same seed."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in perm]


@dataclasses.dataclass(frozen=True)
class ShardRead:
    """One read task: which rows of which shard (see `iter_shard_rows`). `key` names the shard in rows and in
    resume state; it includes the corpus URI so that shards of several corpora never collide."""

    storage: Storage
    shard: ShardInfo
    data_type: str
    key: str
    start: int = 0
    skip: frozenset[int] = frozenset()
    offset: int = 0
    stride: int = 1

    @property
    def num_rows(self) -> int:
        rows = range(self.start, self.shard.num_cuts)
        return sum(1 for i in rows if i % self.stride == self.offset and i not in self.skip)

    def rows(self) -> Iterator[dict]:
        return iter_shard_rows(self.storage, self.shard, self.data_type, self.start, skip=self.skip,
                               offset=self.offset, stride=self.stride, name=self.key)


def corpus_shards(uri: str, data_type: str, endpoint_url: str | None = None,
                  manifest: CorpusManifest | None = None) -> tuple[Storage, list[ShardInfo]]:
    """The storage and the shards of one data type of a corpus; `manifest`: the corpus's, when the caller has read
    it already (else it is read here)."""
    manifest = manifest or read_manifest(uri, endpoint_url)
    if data_type not in manifest.types:
        raise ManifestError(f"{uri}: no {data_type!r} shards; the corpus has {sorted(manifest.types)}")
    return open_storage(uri, endpoint_url), manifest.types[data_type].shards


def plan_reads(uris: str | list[str], data_type: str, *, seed: int = 0, epoch: int = 0, rank: int = 0,
               world_size: int = 1, start: dict[str, int] | None = None, skip: dict[str, set[int]] | None = None,
               endpoint_url: str | None = None, manifests: dict | None = None) -> list[ShardRead]:
    """The read tasks of one epoch of one data type for one rank.

    Shards of all corpora are shuffled together by (seed, epoch). With at least `world_size` shards each rank gets
    whole shards (round robin); with fewer, every rank reads every shard and keeps rows index % world_size == rank.
    `start`/`skip` (by shard key) drop rows a resumed reader has already consumed; `manifests` (by URI): the
    corpora's manifests where the caller holds them (the training run reads each once)."""
    uris = [uris] if isinstance(uris, str) else list(uris)
    pool = []
    for uri in uris:
        storage, shards = corpus_shards(uri, data_type, endpoint_url, (manifests or {}).get(uri))
        pool += [(storage, s, f"{uri.rstrip('/')}/{s.cuts}") for s in shards]
    perm = np.random.default_rng([seed, epoch]).permutation(len(pool))
    ordered = [pool[i] for i in perm]
    if len(ordered) >= world_size:
        mine = [(st, sh, key, 0, 1) for st, sh, key in ordered[rank::world_size]]
    else:
        mine = [(st, sh, key, rank, world_size) for st, sh, key in ordered]
    start, skip = start or {}, skip or {}
    reads = [ShardRead(st, sh, data_type, key, start.get(key, 0), frozenset(skip.get(key, ())), off, stride)
             for st, sh, key, off, stride in mine]
    return [r for r in reads if r.num_rows > 0]


def _read_task_fn(read: ShardRead, rows_per_block: int):
    def read_fn():
        block: list[dict] = []
        for row in read.rows():
            block.append(row)
            if len(block) == rows_per_block:
                yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=ROW_SCHEMA)
    return read_fn


class SharDatasource(Datasource):
    """A Ray Data datasource over planned shard reads (`plan_reads`): one read task per shard, in plan order."""

    def __init__(self, reads: list[ShardRead], rows_per_block: int = 16):
        self.reads = list(reads)
        self.rows_per_block = rows_per_block

    def estimate_inmemory_data_size(self) -> int:
        return int(sum(r.shard.seconds for r in self.reads) * SAMPLING_RATE * 4)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for read in self.reads:
            meta = BlockMetadata(num_rows=read.num_rows, size_bytes=int(read.shard.seconds * SAMPLING_RATE * 4),
                                 exec_stats=None, input_files=(read.key,))
            tasks.append(ReadTask(_read_task_fn(read, self.rows_per_block), meta, schema=ROW_SCHEMA,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def reads_dataset(reads: list[ShardRead], *, ordered: bool = True, read_cpus: float = 0.25):
    """A Ray Data dataset over `reads`. `ordered` keeps plan order (deterministic streams, exact resume)."""
    import ray.data

    ds = ray.data.read_datasource(SharDatasource(reads), override_num_blocks=max(1, len(reads)), num_cpus=read_cpus)
    ds.context.execution_options.preserve_order = ordered
    return ds


def shar_dataset(uris: str | list[str], data_type: str, *, seed: int = 0, epoch: int = 0,
                 start: dict[str, int] | None = None, endpoint_url: str | None = None, ordered: bool = False):
    """`ray.data.Dataset` of one data type's rows, all shards (error rows included; see module doc)."""
    return reads_dataset(plan_reads(uris, data_type, seed=seed, epoch=epoch, start=start, endpoint_url=endpoint_url),
                         ordered=ordered)


def row_to_conversation(row: dict) -> Conversation:
    """A good row back to a `Conversation` with samples in its audio parts."""
    if is_error_row(row):
        raise SchemaError(f"row {row.get('shard')}:{row.get('index')} is an error row: {row['error']}")
    raw = row["audio"]
    audio = np.frombuffer(raw, dtype="<f4").copy() if isinstance(raw, (bytes, bytearray)) else None  # writable
    return fill_conversation(row["id"], json.loads(row["conversation"]), audio)


def iter_corpus_rows(uri: str, data_type: str, *, endpoint_url: str | None = None,
                     manifest: CorpusManifest | None = None) -> Iterator[dict]:
    """All rows of one data type in manifest order, in this process (no Ray): for small jobs and benchmarks."""
    storage, shards = corpus_shards(uri, data_type, endpoint_url, manifest)
    for shard in shards:
        yield from iter_shard_rows(storage, shard, data_type)


def iter_cut_dicts(uri: str, data_type: str, *, endpoint_url: str | None = None,
                   manifest: CorpusManifest | None = None) -> Iterator[dict]:
    """The cut manifests (JSON dicts, no audio) of one data type; unreadable lines are logged and skipped.
    `manifest`: the corpus's, when the caller has read it already."""
    manifest = manifest or read_manifest(uri, endpoint_url)
    storage = open_storage(uri, endpoint_url)
    for shard in manifest.types.get(data_type, TypeInfo()).shards:
        try:
            stream = storage.open_read(shard.cuts)
        except StorageError as e:
            logger.warning("shard %s missing: %s", shard.cuts, e)
            continue
        with gzip.open(stream, "rt", encoding="utf-8") as lines:
            for index, line in enumerate(lines):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    logger.warning("shard %s item %d: unreadable cut line (%s)", shard.cuts, index, e)
