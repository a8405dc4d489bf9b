"""Micro-batches for the SFT loop, made ahead of the step in a background thread.

The mixture sampler decides each micro-batch's data type from the step number alone, so the batches to come are
known in advance: a thread pulls the rows from that type's stream and runs the model's processor (tokenization,
chat template, audio to tensors) while the current step computes. Each batch carries its stream's state right
after it was taken, so a checkpoint records exactly what training consumed, not what the thread read ahead.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from jobs.training.metrics import BatchStats


@dataclass
class MicroBatch:
    step: int
    micro: int
    data_type: str
    rows: list[dict]
    batch: dict  # the processor's tensors (on CPU)
    stream_state: dict  # the data type's TypeStream.state_dict() after these rows
    wait_s: float = 0.0  # seconds training waited for it (the rest of its reading and tensorizing overlapped)

    def stats(self, loss: float, flops=None) -> BatchStats:
        """`flops`: the model's `ForwardFlops`, to count this batch's model FLOPs (None: not counted)."""
        from data_ops.mix_sampler import padded_share

        durations = [r["duration"] for r in self.rows if r["num_samples"]]
        return BatchStats(self.data_type, loss, samples=len(self.rows), tokens=int(self.batch["attention_mask"].sum()),
                          audio_s=float(sum(durations)), padded_share=padded_share(durations) if durations else None,
                          data_s=self.wait_s, flops=flops.train_step(self.batch) if flops is not None else 0.0)


class BatchPrefetcher:
    """Iterates `MicroBatch`es for steps `start_step`, `start_step + 1`, ..., `grad_accum` per step, keeping up to
    `depth` ready. `draw(step, micro)` names the data type; `to_batch(rows)` tensorizes."""

    def __init__(self, streams: dict, draw: Callable[[int, int], str], to_batch: Callable[[list[dict]], dict], *,
                 start_step: int, grad_accum: int, depth: int = 2):
        self.streams, self.draw, self.to_batch = streams, draw, to_batch
        self.consumed = {t: s.state_dict() for t, s in streams.items()}  # what training has taken, per type
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start_step, grad_accum), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _produce(self, step: int, grad_accum: int) -> None:
        try:
            while not self._stop.is_set():
                for micro in range(grad_accum):
                    dtype = self.draw(step, micro)
                    stream = self.streams[dtype]
                    rows = stream.next_batch()
                    self._put(MicroBatch(step, micro, dtype, rows, self.to_batch(rows), stream.state_dict()))
                step += 1
        except BaseException as e:  # handed to the training thread, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def next(self) -> MicroBatch:
        t0 = time.perf_counter()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        item.wait_s = time.perf_counter() - t0
        self.consumed[item.data_type] = item.stream_state
        return item

    def error_rows(self) -> int:
        return sum(sum(s.get("errors", {}).values()) for s in self.consumed.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
