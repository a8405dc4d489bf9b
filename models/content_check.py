"""Does the audio path carry content? A check that the length of the audio cannot pass.

A SpeechLM whose audio path has collapsed still trains: the loss falls as the LM learns the answers' templates,
and with audio of distinct lengths it can even memorise answers by length, so a falling loss and plausible
transcripts prove nothing. This check compares the loss on the same conversations with the audio changed so that
only content differs:

- `other`: every audio part replaced by another utterance of the set cut or zero-padded to exactly the same
  number of samples (the partner is the next one in length order, so little is cut or padded);
- `reversed`: every audio part time-reversed (same length, same spectrum, no words).

A model that reads the audio pays for both (`gap` = other - matched, in nats per answer token); one that reads
only length, or nothing, scores the same on all three. Used by training (logged as `speech/content_gap`) and
evaluation; it knows nothing of either.

Legend: B conversations, L tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from models.conversation import AudioPart, Conversation, Turn
from models.processor import move_batch


@dataclasses.dataclass(frozen=True)
class ContentGap:
    matched: float
    """Mean loss per answer token with each conversation's own audio."""
    other: float
    """The same with another utterance of the same length in place of each audio."""
    reversed: float
    """The same with each audio time-reversed."""
    conversations: int

    @property
    def gap(self) -> float:
        return self.other - self.matched

    @property
    def gap_reversed(self) -> float:
        return self.reversed - self.matched

    def metrics(self, prefix: str = "speech/") -> dict[str, float]:
        return {f"{prefix}content_gap": self.gap, f"{prefix}content_gap_reversed": self.gap_reversed,
                f"{prefix}loss_matched_audio": self.matched, f"{prefix}loss_other_audio": self.other,
                f"{prefix}loss_reversed_audio": self.reversed}


def _with_audio(conv: Conversation, new_audio: list[np.ndarray]) -> Conversation:
    """`conv` with its audio parts' samples replaced in order (text, roles and other fields kept)."""
    it = iter(new_audio)
    turns = [Turn(t.role, [dataclasses.replace(p, audio=next(it)) if isinstance(p, AudioPart) else p
                           for p in t.parts]) for t in conv.turns]
    return Conversation(turns)


def _fit(samples: np.ndarray, n: int) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)[:n]
    return np.pad(samples, (0, n - len(samples))) if len(samples) < n else samples


def other_audio_same_length(conversations: Sequence[Conversation]) -> list[Conversation]:
    """Each conversation with every audio part replaced by audio of another conversation of the set, cut or
    zero-padded to the original's exact length. Partners: the next conversation in order of (first) audio
    length, cyclically, so every audio is used once and lengths differ little."""
    if len(conversations) < 2:
        raise ValueError("the content check needs at least two conversations with audio")
    first = [np.asarray(c.audio_parts[0].audio) for c in conversations]
    order = sorted(range(len(conversations)), key=lambda i: len(first[i]))
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    out = []
    for i, conv in enumerate(conversations):
        donor = conversations[partner[i]].audio_parts
        out.append(_with_audio(conv, [_fit(donor[k % len(donor)].audio, p.num_samples)
                                      for k, p in enumerate(conv.audio_parts)]))
    return out


def time_reversed_audio(conversations: Sequence[Conversation]) -> list[Conversation]:
    return [_with_audio(c, [np.ascontiguousarray(np.asarray(p.audio, dtype=np.float32)[::-1])
                            for p in c.audio_parts]) for c in conversations]


@torch.no_grad()
def answer_token_losses(model, conversations: Sequence[Conversation], batch_size: int = 8) -> list[tuple[float, int]]:
    """Per conversation: (summed cross-entropy over its answer tokens, how many answer tokens)."""
    out: list[tuple[float, int]] = []
    for i in range(0, len(conversations), batch_size):
        batch = model.processor(conversations[i:i + batch_size])
        sums, counts = model.answer_nll(**move_batch(batch, model.device))  # logits at answer positions only
        out += [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist())]
    return out


def answer_loss(model, conversations: Sequence[Conversation], batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over all `conversations` (not a mean of batch means)."""
    losses = answer_token_losses(model, conversations, batch_size)
    return sum(s for s, _ in losses) / max(sum(n for _, n in losses), 1)


def content_gap(model, conversations: Sequence[Conversation], batch_size: int = 8) -> ContentGap:
    """The answer loss with the right audio, another utterance of the same length, and the audio reversed.
    `conversations` need audio in a user turn and an assistant answer; the model is put in eval mode for the
    measurement and given back in the mode it had."""
    convs = [c for c in conversations if c.audio_parts]
    was_training = model.training
    model.eval()
    try:
        result = ContentGap(matched=answer_loss(model, convs, batch_size),
                            other=answer_loss(model, other_audio_same_length(convs), batch_size),
                            reversed=answer_loss(model, time_reversed_audio(convs), batch_size),
                            conversations=len(convs))
    finally:
        model.train(was_training)
    return result
