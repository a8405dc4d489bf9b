"""Import and export NeMo `multimodal_conversation` JSONL manifests, so users with NeMo data can bring it.

One JSON object per line (NeMo's `NeMoMultimodalConversationJsonlAdapter`):

    {"id": "...", "conversations": [
        {"from": "User", "type": "text", "value": "Transcribe this:"},
        {"from": "User", "type": "audio", "value": "audio/a.wav", "duration": 2.1},
        {"from": "Assistant", "type": "text", "value": "hello"}]}

Consecutive entries from the same speaker form one turn, in order (NeMo merges them the same way). Relative
audio paths resolve against the manifest's folder. `custom._skipme` lines are skipped, as NeMo does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import soundfile as sf
from lhotse import MonoCut

from data_ops.schema import (SAMPLING_RATE, SchemaError, conversation_to_cut, cut_to_conversation, iter_jsonl,
                             load_audio_16k)
from models.conversation import AudioPart, Conversation, TextPart, Turn

SPEAKERS = {"user": "User", "assistant": "Assistant", "system": "System"}  # our role -> NeMo's "from"
_ROLES = {v.lower(): k for k, v in SPEAKERS.items()}


def read_nemo_manifest(path: str | Path, *, data_type: str, task: str, langs: list[str]) -> Iterator[MonoCut]:
    """Yield one cut per manifest line. A malformed line raises `SchemaError` naming the file and line."""
    path = Path(path)
    root = path.parent
    for where, obj in iter_jsonl(path):
        if isinstance(obj, SchemaError):
            raise obj
        custom = obj.get("custom")
        if isinstance(custom, dict) and custom.get("_skipme"):
            continue
        entries = obj.get("conversations")
        if not isinstance(entries, list) or not entries:
            raise SchemaError(f"{where}: needs a non-empty 'conversations' list")
        turns: list[Turn] = []
        for j, e in enumerate(entries):
            if not isinstance(e, dict):
                raise SchemaError(f"{where}: entry {j} must be an object with 'from', 'type' and 'value'")
            role = _ROLES.get(str(e.get("from", "")).lower())
            if role is None:
                raise SchemaError(f"{where}: entry {j} 'from' must be User, Assistant or System, got {e.get('from')!r}")
            kind = e.get("type", "text")
            if kind == "text":
                part = TextPart(str(e.get("value", "")))
            elif kind == "audio":
                if not isinstance(e.get("value"), str) or not e["value"]:
                    raise SchemaError(f"{where}: entry {j} audio needs its file path as 'value'")
                audio_path = Path(e["value"])
                audio_path = audio_path if audio_path.is_absolute() else root / audio_path
                if not audio_path.is_file():
                    raise SchemaError(f"{where}: entry {j} audio file {audio_path} does not exist")
                try:
                    part = AudioPart(load_audio_16k(audio_path), SAMPLING_RATE)
                except Exception as ex:
                    raise SchemaError(f"{where}: entry {j} audio file {audio_path} cannot be decoded: {ex}") from ex
            else:
                raise SchemaError(f"{where}: entry {j} type must be 'text' or 'audio', got {kind!r}")
            if turns and turns[-1].role == role:
                turns[-1].parts.append(part)
            else:
                turns.append(Turn(role=role, parts=[part]))
        cut_id = str(obj.get("id", f"{path.stem}-{where.rsplit(':', 1)[1]}"))
        yield conversation_to_cut(Conversation(turns), cut_id=cut_id, data_type=data_type, task=task, langs=langs)


def write_nemo_manifest(cuts, path: str | Path, audio_dir: str | Path) -> int:
    """Write cuts of this project's schema as a NeMo manifest; audio segments become WAV files in `audio_dir`
    (paths relative to the manifest's folder when inside it). Returns the number of lines written."""
    path, audio_dir = Path(path), Path(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for cut in cuts:
            conv = cut_to_conversation(cut)
            entries, k = [], 0
            for turn in conv.turns:
                speaker = SPEAKERS[turn.role]
                for part in turn.parts:
                    if isinstance(part, TextPart):
                        entries.append({"from": speaker, "type": "text", "value": part.text})
                        continue
                    wav = audio_dir / f"{cut.id}-{k}.wav"
                    k += 1
                    sf.write(wav, part.audio, SAMPLING_RATE, subtype="FLOAT")
                    try:
                        value = str(wav.resolve().relative_to(path.parent.resolve()))
                    except ValueError:
                        value = str(wav.resolve())
                    entries.append({"from": speaker, "type": "audio", "value": value,
                                    "duration": round(part.duration, 6)})
            f.write(json.dumps({"id": cut.id, "conversations": entries}) + "\n")
            n += 1
    return n
