"""The content check during training: does the audio path carry content (`models.content_check`)?"""

from __future__ import annotations

from typing import Sequence

from models.content_check import content_gap

# Below this the right audio lowers the answers' loss by less than 0.05 nats per token against another utterance
# of the same length: the LM answers as if it had heard nothing (a model that reads the audio is well above 0.5).
CONTENT_GAP_FLOOR = 0.05
CONTENT_PROBE_SIZE = 16


def first_conversations(corpus_uris: Sequence[str], data_type: str, size: int,
                        endpoint_url: str | None = None, manifests: dict | None = None) -> list:
    """The first `size` good rows of `data_type` of the corpora, in manifest order, as conversations (corpora
    without that type are passed over). `manifests` (by URI): the corpora's, where the caller has read them."""
    from data_ops.shar_datasource import is_error_row, iter_corpus_rows, row_to_conversation
    from data_ops.shards import known_manifest

    out: list = []
    for uri in corpus_uris:
        manifest = known_manifest(uri, endpoint_url, manifests)
        if data_type not in manifest.types:
            continue
        for row in iter_corpus_rows(uri, data_type, endpoint_url=endpoint_url, manifest=manifest):
            if not is_error_row(row):
                out.append(row_to_conversation(row))
            if len(out) == size:
                return out
    return out


def content_probe(corpus_uris: Sequence[str], endpoint_url: str | None = None,
                  size: int = CONTENT_PROBE_SIZE, manifests: dict | None = None) -> list:
    """A fixed set of speech conversations: the first `size` ASR/AST rows of the corpora, in order (empty when
    they have fewer than two: the check swaps audio between conversations). Training and evaluation both use it."""
    probe = first_conversations(corpus_uris, "asr_ast", size, endpoint_url, manifests)
    return probe if len(probe) >= 2 else []


class ContentMonitor:
    """The content check on a fixed probe during training: metrics to log, one line per check, and a warning in the
    job log the first time the audio path carries no content after warm-up (when a gap near zero means something;
    repeating it every check would bury the rest of the log)."""

    def __init__(self, probe: list, warmup_steps: int, log=print):
        self.probe, self.warmup_steps, self.log = probe, warmup_steps, log
        self.warned = False

    def __call__(self, model, step: int) -> dict[str, float]:
        result = content_gap(model, self.probe)
        self.log(f"step {step}: content gap {result.gap:.3f} nats/token (loss {result.matched:.3f} with the right "
                 f"audio, {result.other:.3f} with another utterance of the same length, {result.reversed:.3f} "
                 "reversed)")
        if step > self.warmup_steps and result.gap < CONTENT_GAP_FLOOR and not self.warned:
            self.log(f"WARNING: the audio path carries no content (content gap {result.gap:.3f} < "
                     f"{CONTENT_GAP_FLOOR}): the model answers the same whatever is said. Check the encoder's init or "
                     "checkpoint, and lower encoder_lr / adapter_lr (docs/ablation.md). The gap is logged to MLflow "
                     "as speech/content_gap at every check.")
            self.warned = True
        return result.metrics()
