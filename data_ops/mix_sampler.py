"""The data mixture of joint SFT: which data type each mini-batch comes from, and each type's resumable stream.

- `mix_sampler(ratios, seed)` draws the data type of (step, micro-batch) from the ratios with a generator seeded
  by (seed, step, micro): the same on every rank without communication, and a resumed run draws exactly what the
  original would have (no sampler state to save).
- `TypeStream` is one data type's endless stream of batches for one rank: epoch after epoch (seeded per-epoch
  shard order, `plan_reads`), batches of that type's size, grouped by duration so that padding stays small, error
  rows dropped and counted, rows over the per-sample caps (audio seconds, LM tokens) skipped and counted. Its
  `state_dict()` is the exact stream position: epoch, per shard how far it was read, and which rows were read
  but not yet handed out (the bucketing buffer). `load_state_dict()` continues from there: no row handed out
  twice, none skipped that the uninterrupted stream would have handed out.

Caps apply as rows are read, before they are grouped into batches: every batch still has the type's batch size,
and a skipped row counts as read (`read_upto`), so a restored stream neither re-reads nor re-counts it.

Duration grouping: rows are read into a buffer of `bucket_batches` batches, sorted by duration, cut into batches
of neighbours, and those batches handed out in a seeded random order. This is the idea of Lhotse's
`DynamicBucketingSampler` in a form whose state is a handful of row ids (Lhotse's sampler works on CutSets and
restores by replaying), which is what exact resume of a Ray Data stream needs.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

import numpy as np

from data_ops.shar_datasource import ShardRead, is_error_row, plan_reads

# skip counts are keyed by the recipe's names of the caps
AUDIO_CAP, TOKEN_CAP = "max_sample_audio_s", "max_sample_tokens"


def mix_sampler(ratios: dict[str, float], seed: int) -> Callable[[int, int], str]:
    """(step, micro) -> data type, drawn with probability `ratios[type]`."""
    names = sorted(k for k, v in ratios.items() if v > 0)
    probs = np.array([ratios[k] for k in names], dtype=np.float64)
    probs = probs / probs.sum()

    def draw(step: int, micro: int = 0) -> str:
        return names[int(np.random.default_rng([seed, step, micro]).choice(len(names), p=probs))]

    return draw


def padded_share(durations: list[float]) -> float:
    """Share of a padded batch's audio frames that are padding."""
    if not durations or max(durations) == 0:
        return 0.0
    return 1.0 - sum(durations) / (len(durations) * max(durations))


class TypeStream:
    """Endless, resumable, duration-grouped batches of one data type for one rank.

    `open_rows(reads)` turns planned shard reads into an iterator of rows: a Ray Data dataset in training
    (`reads_dataset(reads).iter_rows()`), plain `read.rows()` in a single process.

    `max_audio_s` / `max_tokens`: rows longer than this (audio seconds; LM positions as `count_tokens(row)` gives
    them) are skipped and counted in `skipped` (cap name -> rows); None: no cap. Audio is checked first (free:
    the row carries its duration), so a row over both caps counts under the audio cap.
    """

    def __init__(self, uris: list[str], data_type: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, bucket_batches: int = 8, endpoint_url: str | None = None,
                 open_rows: Callable[[list[ShardRead]], Iterator[dict]] | None = None,
                 max_audio_s: float | None = None, max_tokens: int | None = None,
                 count_tokens: Callable[[dict], int] | None = None):
        if max_tokens is not None and count_tokens is None:
            raise ValueError(f"{data_type}: a token cap (max_tokens={max_tokens}) needs count_tokens")
        self.max_audio_s, self.max_tokens, self.count_tokens = max_audio_s, max_tokens, count_tokens
        self.uris, self.data_type, self.batch_size = list(uris), data_type, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.bucket_batches = max(1, bucket_batches)
        self.endpoint_url = endpoint_url
        self.open_rows = open_rows or (lambda reads: (row for r in reads for row in r.rows()))
        self.epoch = 0
        self.read_upto: dict[str, int] = {}  # shard key -> index after the last row read this epoch
        self.pending: list[list[dict]] = []  # batches formed but not handed out (front = next)
        self.errors: Counter = Counter()  # error rows dropped, by shard
        self.skipped: Counter = Counter()  # rows over a cap, by cap name
        self._rows: Iterator[dict] | None = None

    # -- iteration ------------------------------------------------------------------------------------------------
    def _open_epoch(self) -> None:
        # Everything below `read_upto` was handed out or sits in `pending` (in memory): start reading after it.
        reads = plan_reads(self.uris, self.data_type, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, start=dict(self.read_upto), endpoint_url=self.endpoint_url)
        # iter(): Ray's `iter_rows()` is an iterable that restarts on every `for`; one iterator per epoch
        self._rows = iter(self.open_rows(reads))

    def _fill(self) -> bool:
        """Read up to `bucket_batches` batches of rows, group them by duration; False at the end of the epoch."""
        if self._rows is None:
            self._open_epoch()
        want = self.batch_size * self.bucket_batches
        buf: list[dict] = []
        for row in self._rows:
            self.read_upto[row["shard"]] = max(self.read_upto.get(row["shard"], 0), row["index"] + 1)
            if is_error_row(row):
                self.errors[row["shard"]] += 1
                continue
            cap = self._over_cap(row)
            if cap:
                self.skipped[cap] += 1
                continue
            buf.append(row)
            if len(buf) == want:
                break
        if not buf:
            return False
        buf.sort(key=lambda r: (r["duration"], r["shard"], r["index"]))
        batches = [buf[i:i + self.batch_size] for i in range(0, len(buf), self.batch_size)]
        order = np.random.default_rng([self.seed, self.epoch, len(self.read_upto), sum(self.read_upto.values())])
        self.pending += [batches[i] for i in order.permutation(len(batches))]
        return True

    def _over_cap(self, row: dict) -> str | None:
        """The name of the cap `row` exceeds, or None."""
        if self.max_audio_s is not None and row["duration"] > self.max_audio_s:
            return AUDIO_CAP
        if self.max_tokens is not None and self.count_tokens(row) > self.max_tokens:
            return TOKEN_CAP
        return None

    def next_batch(self) -> list[dict]:
        ended_empty = False  # an epoch ended in this call: a second end means a whole epoch gave no batch
        while not self.pending:
            if not self._fill():
                if not self.read_upto or ended_empty:
                    raise RuntimeError(f"{self.data_type}: rank {self.rank} got no usable rows from {self.uris} "
                                       f"({sum(self.errors.values())} error rows, skipped over the caps: "
                                       f"{dict(self.skipped) or 'none'})")
                ended_empty = True
                self.epoch += 1
                self.read_upto = {}
                self._rows = None
        return self.pending.pop(0)

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "read_upto": dict(self.read_upto),
                "pending": [[[r["shard"], r["index"]] for r in b] for b in self.pending],
                "errors": dict(self.errors), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Pending batches are re-read (their rows only) before anything new."""
        self.epoch = int(state["epoch"])
        self.errors = Counter(state.get("errors", {}))
        self.skipped = Counter(state.get("skipped", {}))
        pending = [[(k, int(i)) for k, i in b] for b in state["pending"]]
        wanted = {(k, i) for b in pending for k, i in b}
        found: dict[tuple[str, int], dict] = {}
        if wanted:  # fetch exactly the pending rows: start at each shard's first, skip the rest
            by_shard: dict[str, set[int]] = {}
            for k, i in wanted:
                by_shard.setdefault(k, set()).add(i)
            start = {k: min(ids) for k, ids in by_shard.items()}
            skip = {k: set(range(min(ids), max(ids) + 1)) - ids for k, ids in by_shard.items()}
            reads = [r for r in plan_reads(self.uris, self.data_type, seed=self.seed, epoch=self.epoch,
                                           rank=self.rank, world_size=self.world_size, start=start, skip=skip,
                                           endpoint_url=self.endpoint_url) if r.key in by_shard]
            for read in reads:
                for row in read.rows():
                    if (row["shard"], row["index"]) in wanted:
                        found[(row["shard"], row["index"])] = row
                    if row["index"] > max(by_shard[read.key]):
                        break
        self.pending = [[found[(k, i)] for k, i in b if (k, i) in found] for b in pending]
        self.pending = [b for b in self.pending if b]
        self.read_upto = {k: int(v) for k, v in state["read_upto"].items()}
        self._rows = None
