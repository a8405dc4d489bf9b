"""One conversation schema for all four SFT data types, on Lhotse cuts.

A training example is one `MonoCut`:
- `cut.recording` holds every audio segment of the conversation, concatenated (16 kHz mono); a text-only
  conversation has no recording;
- `cut.custom["conversation"]` is `Conversation.to_dict()`: turns of ordered parts, where each audio part's
  `source` is `"samples:START:END"`, an exact sample range inside the cut's audio (sample indices, not float
  seconds, so slicing back is exact);
- `cut.custom["data_type"]` is one of `DATA_TYPES` (the mixture's unit: each mini-batch comes from one type),
  `cut.custom["task"]` (e.g. "asr", "ast", "sqa", "mixed_modal", "text") and `cut.custom["langs"]` (e.g.
  ["en"] or ["de", "en"] for De->En translation).

`conversation_to_cut` builds such a cut; `cut_to_conversation` turns it back into a `Conversation` with samples.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import soundfile as sf
from lhotse import MonoCut, Recording
from lhotse.audio import AudioSource

from models.audio import load_audio_file
from models.conversation import AudioPart, Conversation, ConversationError, lone_surrogate

DataType = Literal["text", "asr_ast", "sqa", "mixed_modal"]
DATA_TYPES: tuple[str, ...] = ("text", "asr_ast", "sqa", "mixed_modal")
SAMPLING_RATE = 16000
_SOURCE = re.compile(r"^samples:(\d+):(\d+)$")


def load_audio_16k(path) -> np.ndarray:
    """An audio file -> mono float32 (S,) at the corpus rate (`models.audio.load_audio_file`)."""
    return load_audio_file(path, SAMPLING_RATE)


class SchemaError(ValueError):
    """A cut does not follow the conversation schema; the message names the cut and the problem."""


def iter_jsonl(path) -> "Iterator[tuple[str, dict | SchemaError]]":
    """(where, object) for each non-empty line of a JSONL file, `where` being "file:line"; a line that is not UTF-8
    or not a JSON object comes as a SchemaError naming it instead (the caller skips or raises it)."""
    import json

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, SchemaError(f"{where}: not UTF-8 text (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, SchemaError(f"{where}: not JSON ({e.msg})")
                continue
            except RecursionError:
                yield where, SchemaError(f"{where}: JSON nested too deeply")
                continue
            yield where, obj if isinstance(obj, dict) else SchemaError(f"{where}: each line must be a JSON object")


def read_utf8(path) -> str:
    """A text file's contents; a SchemaError naming the file and line where it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SchemaError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None


def check_unicode(text: str, where: str) -> str:
    """`text`, or a SchemaError naming `where` when it is not valid Unicode (`lone_surrogate`)."""
    at = lone_surrogate(text)
    if at is not None:
        raise SchemaError(f"{where}: a lone surrogate at character {at} (not valid Unicode)")
    return text


def conversation_to_cut(
    conv: Conversation,
    *,
    cut_id: str,
    data_type: str,
    task: str,
    langs: Sequence[str],
    extra: dict | None = None,
) -> MonoCut:
    """Pack a conversation whose audio parts hold samples (16 kHz mono float) into one cut."""
    if data_type not in DATA_TYPES:
        raise SchemaError(f"cut {cut_id}: data_type must be one of {DATA_TYPES}, got {data_type!r}")
    segments, pos = [], 0
    conv_dict = conv.to_dict()
    for t, turn in enumerate(conv.turns):
        for p, part in enumerate(turn.parts):
            if not isinstance(part, AudioPart):
                continue
            if part.audio is None or part.num_samples == 0:
                raise SchemaError(f"cut {cut_id}: turn {t} part {p} has no audio samples")
            if part.sampling_rate != SAMPLING_RATE:
                raise SchemaError(f"cut {cut_id}: turn {t} part {p} is {part.sampling_rate} Hz; store 16 kHz audio")
            a = np.asarray(part.audio, dtype=np.float32).reshape(-1)
            segments.append(a)
            conv_dict["turns"][t]["parts"][p]["source"] = f"samples:{pos}:{pos + len(a)}"
            pos += len(a)
    custom = {"conversation": conv_dict, "data_type": data_type, "task": task, "langs": list(langs), **(extra or {})}
    if not segments:
        return MonoCut(id=cut_id, start=0.0, duration=0.0, channel=0, recording=None, custom=custom)
    audio = np.concatenate(segments)
    buf = io.BytesIO()
    # FLOAT WAV in memory keeps the samples bit-exact until the Shar writer encodes them.
    sf.write(buf, audio, SAMPLING_RATE, format="WAV", subtype="FLOAT")
    recording = Recording(
        id=cut_id, sources=[AudioSource(type="memory", channels=[0], source=buf.getvalue())],
        sampling_rate=SAMPLING_RATE, num_samples=len(audio), duration=len(audio) / SAMPLING_RATE,
    )
    return MonoCut(id=cut_id, start=0.0, duration=recording.duration, channel=0, recording=recording, custom=custom)


def cut_to_conversation(cut, audio: np.ndarray | None = None) -> Conversation:
    """The cut's conversation with every audio part's samples filled in.

    `audio` (S,) may be passed when the caller already decoded the cut's audio (e.g. a datasource that decoded
    and resampled it); otherwise it is loaded from the cut.
    """
    custom = getattr(cut, "custom", None) or {}
    if "conversation" not in custom:
        raise SchemaError(f"cut {cut.id}: no 'conversation' in its custom fields; not written by this schema")
    if audio is None and cut.recording is not None and custom["conversation"] and _has_audio(custom["conversation"]):
        audio = cut.load_audio()[0]
    return fill_conversation(cut.id, custom["conversation"], audio)


def _has_audio(conv_dict: dict) -> bool:
    return any(p.get("type") == "audio" for t in conv_dict.get("turns", []) for p in t.get("parts", []))


def fill_conversation(cut_id: str, conv_dict: dict, audio: np.ndarray | None) -> Conversation:
    """`Conversation.from_dict(conv_dict)` with each audio part's "samples:START:END" cut out of `audio` (S,)."""
    try:
        conv = Conversation.from_dict(conv_dict)
    except ConversationError as e:
        raise SchemaError(f"cut {cut_id}: {e}") from e
    parts = conv.audio_parts
    if not parts:
        return conv
    if audio is None:
        raise SchemaError(f"cut {cut_id}: the conversation has audio parts but the cut has no recording")
    for part in parts:
        m = _SOURCE.match(part.source or "")
        if not m:
            raise SchemaError(f"cut {cut_id}: audio part source {part.source!r} is not 'samples:START:END'")
        start, end = int(m.group(1)), int(m.group(2))
        if not 0 <= start < end <= len(audio):
            raise SchemaError(f"cut {cut_id}: audio part {part.source} lies outside the cut's {len(audio)} samples")
        part.audio = np.asarray(audio[start:end], dtype=np.float32)
        part.sampling_rate = SAMPLING_RATE
    return conv
