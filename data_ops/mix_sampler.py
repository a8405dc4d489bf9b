"""The data mixture of joint SFT: which data type each mini-batch comes from, and each type's resumable stream.

- `mix_sampler(ratios, seed)` draws the data type of (step, micro-batch) from the ratios with a generator seeded
  by (seed, step, micro): the same on every rank without communication, and a resumed run draws exactly what the
  original would have (no sampler state to save).
- `TypeStream` is one data type's endless stream of batches for one rank: epoch after epoch (seeded per-epoch
  shard order, `plan_reads`), batches of that type's size (or filled up to its budget), grouped by duration so that
  padding stays small, error rows dropped and counted, rows over the per-sample caps (audio seconds, LM tokens)
  skipped and counted. Its `state_dict()` is the exact stream position: epoch, per shard how far it was read, and
  which rows were read but not yet handed out (the bucketing buffer). `load_state_dict()` continues from there: no
  row handed out twice, none skipped that the uninterrupted stream would have handed out.

Caps apply as rows are read, before they are grouped into batches: every batch still has the type's batch size (or,
with a budget, what the budget allows), and a skipped row counts as read (`read_upto`), so a restored stream
neither re-reads nor re-counts it.

Duration grouping: rows are read into a buffer of `bucket_batches` batches, sorted by duration, cut into batches
of neighbours, and those batches handed out in a seeded random order. This is the idea of Lhotse's
`DynamicBucketingSampler` in a form whose state is a handful of row ids (Lhotse's sampler works on CutSets and
restores by replaying), which is what exact resume of a Ray Data stream needs.

Budget batches (`max_batch_audio_s`, `max_batch_tokens`; both None: the fixed-count batches above, unchanged): a
batch is filled up to a budget of *padded* cost, count x longest in the batch (audio seconds; LM positions as
`count_tokens(row)` gives them), with at most `batch_size` rows, so no batch is larger than the memory plan allows
while short samples travel in larger batches. The buffer is grouped in two dimensions, as NeMo's speechlm2 2-D
bucketing (audio duration x text tokens): duration bins `DURATION_BIN` wide (relative), and inside a bin by text
length, so neighbours are alike in both; batches are then filled greedily with neighbours in that order and handed
out in the same seeded random order. A row whose cost alone is over a budget is skipped and counted, as the caps
do (under `max_batch_audio_s` / `max_batch_tokens`): a batch of one over the budget would break what the plan
relies on. The state is unchanged in form: pending batches are row-id lists, now of varying sizes. The buffer still
holds `bucket_batches` x `batch_size` rows: with `batch_size` raised to the most rows a budget batch may take, it
sorts more rows per batch handed out, which is where much of the padding saved comes from (bench.train_throughput
prints duration grouping over as many rows next to it). The LM length is the processor's count (`count_tokens`)
where the caller gives one (a token cap or budget needs it); otherwise the characters of the row's text stand in,
only to order rows within a duration bin, never to size a batch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Callable, Iterator

import numpy as np

from data_ops.shar_datasource import ShardRead, is_error_row, plan_reads

# skip counts are keyed by the recipe's names of the caps and budgets
AUDIO_CAP, TOKEN_CAP = "max_sample_audio_s", "max_sample_tokens"
AUDIO_BUDGET, TOKEN_BUDGET = "max_batch_audio_s", "max_batch_tokens"
DURATION_BIN = 0.05
"""Width of the duration bins of budget batches, relative (5%: the clips of one bin pad each other by at most ~5%)."""


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
    """Endless, resumable, duration-grouped (or budget-filled) batches of one data type for one rank.

    `open_rows(reads)` turns planned shard reads into an iterator of rows: a Ray Data dataset in training
    (`reads_dataset(reads).iter_rows()`), plain `read.rows()` in a single process.

    `max_audio_s` / `max_tokens`: rows longer than this (audio seconds; LM positions as `count_tokens(row)` gives
    them) are skipped and counted in `skipped` (cap name -> rows); None: no cap. Audio is checked first (free:
    the row carries its duration), so a row over both caps counts under the audio cap.

    `max_batch_audio_s` / `max_batch_tokens`: budget batches (module docstring): each batch's count x its longest
    audio (seconds) / LM length (`count_tokens`) stays within the budget, `batch_size` is then the most rows a batch
    may have; a row over a budget on its own is skipped and counted under the budget's name. None (both): batches
    of exactly `batch_size`.
    """

    def __init__(self, uris: list[str], data_type: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, bucket_batches: int = 8, endpoint_url: str | None = None,
                 open_rows: Callable[[list[ShardRead]], Iterator[dict]] | None = None,
                 max_audio_s: float | None = None, max_tokens: int | None = None,
                 count_tokens: Callable[[dict], int] | None = None,
                 max_batch_audio_s: float | None = None, max_batch_tokens: int | None = None,
                 manifests: dict | None = None):
        if max_tokens is not None and count_tokens is None:
            raise ValueError(f"{data_type}: a token cap (max_tokens={max_tokens}) needs count_tokens")
        if max_batch_tokens is not None and count_tokens is None:
            raise ValueError(f"{data_type}: a token budget (max_batch_tokens={max_batch_tokens}) needs count_tokens")
        self.max_audio_s, self.max_tokens, self.count_tokens = max_audio_s, max_tokens, count_tokens
        self.max_batch_audio_s, self.max_batch_tokens = max_batch_audio_s, max_batch_tokens
        self.uris, self.data_type, self.batch_size = list(uris), data_type, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.bucket_batches = max(1, bucket_batches)
        self.endpoint_url = endpoint_url
        self.manifests = manifests  # the corpora's manifests by URI, when the caller has read them (else read here)
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
                           world_size=self.world_size, start=dict(self.read_upto), endpoint_url=self.endpoint_url,
                           manifests=self.manifests)
        # iter(): Ray's `iter_rows()` is an iterable that restarts on every `for`; one iterator per epoch
        self._rows = iter(self.open_rows(reads))

    @property
    def budgeted(self) -> bool:
        return self.max_batch_audio_s is not None or self.max_batch_tokens is not None

    def _fill(self) -> bool:
        """Read up to `bucket_batches` batches of rows, group them by duration; False at the end of the epoch."""
        if self._rows is None:
            self._open_epoch()
        want = self.batch_size * self.bucket_batches
        buf: list[dict] = []
        lengths: dict[tuple[str, int], int] = {}  # LM length (budget batches' second dimension), by row id
        for row in self._rows:
            self.read_upto[row["shard"]] = max(self.read_upto.get(row["shard"], 0), row["index"] + 1)
            if is_error_row(row):
                self.errors[row["shard"]] += 1
                continue
            cap = self._over_cap(row, lengths)
            if cap:
                self.skipped[cap] += 1
                continue
            buf.append(row)
            if len(buf) == want:
                break
        if not buf:
            return False
        if self.budgeted:
            batches = self._budget_batches(buf, lengths)
        else:
            buf.sort(key=lambda r: (r["duration"], r["shard"], r["index"]))
            batches = [buf[i:i + self.batch_size] for i in range(0, len(buf), self.batch_size)]
        order = np.random.default_rng([self.seed, self.epoch, len(self.read_upto), sum(self.read_upto.values())])
        self.pending += [batches[i] for i in order.permutation(len(batches))]
        return True

    def _length(self, row: dict, lengths: dict) -> int:
        """The row's LM length, counted once per fill. Without `count_tokens` (no token cap or budget), the
        characters of its text stand in: they only order rows of one duration bin, never decide a batch's size."""
        key = (row["shard"], row["index"])
        if key not in lengths:
            if self.count_tokens is not None:
                lengths[key] = int(self.count_tokens(row))
            else:
                turns = json.loads(row["conversation"]).get("turns", [])
                lengths[key] = sum(len(p.get("text", "")) for t in turns for p in t.get("parts", [])
                                   if p.get("type") == "text")
        return lengths[key]

    def _over_cap(self, row: dict, lengths: dict) -> str | None:
        """The name of the cap or budget `row` exceeds, or None. Audio first (free), then tokens."""
        if self.max_audio_s is not None and row["duration"] > self.max_audio_s:
            return AUDIO_CAP
        if self.max_batch_audio_s is not None and row["duration"] > self.max_batch_audio_s:
            return AUDIO_BUDGET
        if self.max_tokens is not None and self._length(row, lengths) > self.max_tokens:
            return TOKEN_CAP
        if self.max_batch_tokens is not None and self._length(row, lengths) > self.max_batch_tokens:
            return TOKEN_BUDGET
        return None

    def _budget_batches(self, buf: list[dict], lengths: dict) -> list[list[dict]]:
        """Budget batches of the buffer: 2-D order (duration bin, LM length), then filled greedily with neighbours
        while count x longest stays within each budget and the count within `batch_size`."""
        def duration_bin(d: float) -> int:
            return -1 if d <= 0 else math.floor(math.log(d) / math.log1p(DURATION_BIN))

        buf.sort(key=lambda r: (duration_bin(r["duration"]), self._length(r, lengths), r["duration"], r["shard"],
                                r["index"]))
        batches: list[list[dict]] = []
        batch: list[dict] = []
        longest_s = longest_len = 0.0
        for row in buf:
            s, n = max(longest_s, row["duration"]), len(batch) + 1
            tokens = max(longest_len, self._length(row, lengths)) if self.max_batch_tokens is not None else 0
            fits = n <= self.batch_size and (self.max_batch_audio_s is None or n * s <= self.max_batch_audio_s) \
                and (self.max_batch_tokens is None or n * tokens <= self.max_batch_tokens)
            if batch and not fits:
                batches.append(batch)
                batch, s = [], row["duration"]
                tokens = self._length(row, lengths) if self.max_batch_tokens is not None else 0
            batch.append(row)
            longest_s, longest_len = s, tokens
        batches.append(batch)
        return batches

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
                                           endpoint_url=self.endpoint_url, manifests=self.manifests)
                     if r.key in by_shard]
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
