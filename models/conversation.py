"""The one conversation type every part of the product speaks.

A `Conversation` is an ordered list of `Turn`s (system / user / assistant). A turn is an ordered list of parts:
`TextPart` or `AudioPart`. Audio is *positional*: an audio part sits exactly where it appears in its turn, and the
processor puts that audio's embeddings there. Users never write placeholder tokens, so a mismatch between
placeholders and audio cannot happen by construction.

data_ops writes conversations into shards, the model's processor turns them into tensors, services build them
from OpenAI requests, evaluation reads them back. This module has no dependency on torch, Ray or storage.

Not for: loading audio from files or URLs (data_ops and services do that), resampling (done before audio
reaches the model: the model takes 16 kHz mono only and says so).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Union

import numpy as np

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate (None: valid Unicode). JSON's \\ud800-style escapes can carry them; no
    tokenizer, shard writer or UTF-8 encoder takes them, so inputs are checked where they arrive."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


class ConversationError(ValueError):
    """A conversation or its audio cannot be used as given. The message names the problem and the fix."""


@dataclasses.dataclass
class TextPart:
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclasses.dataclass
class AudioPart:
    """One audio segment. `audio` is a mono waveform (S,) in [-1, 1]; `sampling_rate` in Hz.

    `audio` may be None in a manifest, where `source` says where the samples live (for example
    `"recording_id"` or `"recording_id@offset:duration"`); it must be filled before the model sees it.
    `transcript` optionally records what is said (ASR target, TTS text), useful for evaluation and debugging.
    """

    audio: np.ndarray | None = None
    sampling_rate: int = 16000
    source: str | None = None
    transcript: str | None = None

    @property
    def num_samples(self) -> int:
        return 0 if self.audio is None else int(np.asarray(self.audio).shape[-1])

    @property
    def duration(self) -> float:
        return self.num_samples / float(self.sampling_rate)

    def to_dict(self) -> dict[str, Any]:
        # Samples are not serialized here: shards store audio as audio files, manifests store references.
        d: dict[str, Any] = {"type": "audio", "source": self.source, "sampling_rate": self.sampling_rate}
        if self.transcript is not None:
            d["transcript"] = self.transcript
        return d


Part = Union[TextPart, AudioPart]


@dataclasses.dataclass
class Turn:
    role: Role
    parts: list[Part]

    @classmethod
    def text(cls, role: Role, text: str) -> "Turn":
        return cls(role=role, parts=[TextPart(text)])

    @property
    def audio_parts(self) -> list[AudioPart]:
        return [p for p in self.parts if isinstance(p, AudioPart)]

    @property
    def text_only(self) -> str:
        return " ".join(p.text for p in self.parts if isinstance(p, TextPart))

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "parts": [p.to_dict() for p in self.parts]}


@dataclasses.dataclass
class Conversation:
    turns: list[Turn]

    @property
    def audio_parts(self) -> list[AudioPart]:
        return [a for t in self.turns for a in t.audio_parts]

    def to_dict(self) -> dict[str, Any]:
        return {"turns": [t.to_dict() for t in self.turns]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Conversation":
        """Inverse of `to_dict` (audio samples are not part of the dict; `source` references are kept)."""
        if not isinstance(d, dict) or not isinstance(d.get("turns"), list):
            raise ConversationError("a conversation dict needs a 'turns' list")
        turns = []
        for i, t in enumerate(d["turns"]):
            role = t.get("role") if isinstance(t, dict) else None
            if role not in ROLES:
                raise ConversationError(f"turn {i}: role must be one of {ROLES}, got {role!r}")
            parts: list[Part] = []
            for j, p in enumerate(t.get("parts", [])):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text":
                    parts.append(TextPart(str(p.get("text", ""))))
                elif kind == "audio":
                    parts.append(
                        AudioPart(
                            audio=None,
                            sampling_rate=int(p.get("sampling_rate", 16000)),
                            source=p.get("source"),
                            transcript=p.get("transcript"),
                        )
                    )
                else:
                    raise ConversationError(f"turn {i} part {j}: type must be 'text' or 'audio', got {kind!r}")
            turns.append(Turn(role=role, parts=parts))
        return cls(turns)


def validate_conversation(
    conv: Conversation,
    *,
    sampling_rate: int,
    for_generation: bool,
    placeholder: str,
) -> None:
    """Raise one `ConversationError` naming the first problem that would stop the model using `conv`.

    Checks: non-empty; roles known; system only first; audio only in user turns, mono 1-D, at `sampling_rate`,
    finite and non-empty; no text part containing the reserved `placeholder`; for generation the last turn is
    a user turn; for training there is at least one assistant turn to learn from.
    """
    if not isinstance(conv, Conversation):
        raise ConversationError(f"expected a Conversation, got {type(conv).__name__}")
    if not conv.turns:
        raise ConversationError("the conversation is empty: give at least one user turn")
    for i, turn in enumerate(conv.turns):
        if turn.role not in ROLES:
            raise ConversationError(f"turn {i}: role must be one of {ROLES}, got {turn.role!r}")
        if turn.role == "system" and i != 0:
            raise ConversationError(f"turn {i}: a system turn may only come first")
        if not turn.parts:
            raise ConversationError(f"turn {i} ({turn.role}) has no parts")
        for j, part in enumerate(turn.parts):
            where = f"turn {i} ({turn.role}) part {j}"
            if isinstance(part, TextPart):
                if placeholder in part.text:
                    raise ConversationError(
                        f"{where}: text contains the reserved audio placeholder {placeholder!r}; "
                        "pass audio as an AudioPart where it belongs instead of writing the placeholder"
                    )
            elif isinstance(part, AudioPart):
                if turn.role != "user":
                    raise ConversationError(f"{where}: audio is only supported in user turns")
                _validate_audio(part, sampling_rate, where)
            else:
                raise ConversationError(f"{where}: expected TextPart or AudioPart, got {type(part).__name__}")
    non_system = [t for t in conv.turns if t.role != "system"]
    if not non_system:
        raise ConversationError("the conversation has only a system turn: add a user turn")
    if non_system[0].role != "user":
        raise ConversationError("the first turn after the system prompt must be a user turn")
    if for_generation:
        if conv.turns[-1].role != "user":
            raise ConversationError(
                f"for generation the last turn must be a user turn, got {conv.turns[-1].role!r}: "
                "drop the trailing assistant turn, the model writes it"
            )
    elif not any(t.role == "assistant" for t in conv.turns):
        raise ConversationError("a training conversation needs at least one assistant turn (loss is only on them)")


def _validate_audio(part: AudioPart, sampling_rate: int, where: str) -> None:
    if part.audio is None:
        raise ConversationError(f"{where}: audio samples are missing (source={part.source!r}); load them first")
    if part.sampling_rate != sampling_rate:
        raise ConversationError(
            f"{where}: audio sample rate is {part.sampling_rate} Hz, the model needs {sampling_rate} Hz; "
            "resample it first"
        )
    a = part.audio
    shape = tuple(getattr(a, "shape", ()))
    if len(shape) != 1:
        raise ConversationError(
            f"{where}: audio must be a mono 1-D waveform of shape (samples,), got shape {shape}"
        )
    if shape[0] == 0:
        raise ConversationError(f"{where}: audio has zero samples")
    arr = a if isinstance(a, np.ndarray) else np.asarray(a.detach().cpu() if hasattr(a, "detach") else a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConversationError(f"{where}: audio must be floating point in [-1, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ConversationError(f"{where}: audio contains NaN or infinite samples")
