"""Small datasets in the forms users bring them, made here: a NeMo tarred audio dataset (manifest + tars) and a
Hugging Face dataset file in Common Voice's layout (parquet, an `Audio` column holding the bytes)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf


def wav_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_nemo_tarred(folder: Path, clips: dict[str, tuple[np.ndarray, str]], per_tar: int = 2) -> tuple[Path, str]:
    """name -> (audio, transcript) as NeMo lays a tarred dataset out: `audio_{0..N}.tar` and a manifest naming each
    clip's file inside them. Returns (manifest, tar pattern)."""
    folder.mkdir(parents=True, exist_ok=True)
    names, lines = list(clips), []
    shards = [names[i:i + per_tar] for i in range(0, len(names), per_tar)]
    for shard, members in enumerate(shards):
        with tarfile.open(folder / f"audio_{shard}.tar", "w") as tar:
            for name in members:
                data = wav_bytes(clips[name][0])
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                lines.append({"audio_filepath": name, "text": clips[name][1], "shard_id": shard,
                              "duration": len(clips[name][0]) / 16000})
    manifest = folder / "tarred_audio_manifest.json"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, f"audio_{{0..{len(shards) - 1}}}.tar"


def write_common_voice_parquet(path: Path, clips: list[tuple[np.ndarray, str]], locale: str = "de") -> Path:
    """Common Voice's columns (audio, sentence, locale, path) in one parquet file, audio as WAV bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("sentence", pa.string()), ("locale", pa.string()), ("path", pa.string())])
    rows = [{"audio": {"bytes": wav_bytes(a), "path": f"clip{i}.mp3"}, "sentence": text, "locale": locale,
             "path": f"clip{i}.mp3"} for i, (a, text) in enumerate(clips)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
