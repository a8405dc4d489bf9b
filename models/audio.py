"""The one audio decoder: audio file bytes or a path -> mono float32 samples at the rate the model wants.

Shards (data_ops), HTTP requests (services) and importers all decode through here, so every path averages
channels, resamples (lhotse's resampler) and rejects empty or non-finite audio the same way. The target rate is
always the caller's: the model's `config.sampling_rate`, or the rate a corpus is stored at.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np


class AudioDecodeError(ValueError):
    """Audio that cannot be used; `code` says why: empty_audio, invalid_audio or audio_too_long."""

    def __init__(self, message: str, code: str = "invalid_audio"):
        super().__init__(message)
        self.code = code


def resample(mono: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """(S,) at `from_rate` -> (S',) at `to_rate`."""
    if from_rate == to_rate:
        return mono
    from lhotse.augmentation import Resample

    return Resample(from_rate, to_rate)(mono[None, :])[0]


def _finish(samples: np.ndarray, rate: int, sampling_rate: int, max_seconds: float | None) -> np.ndarray:
    """(S, C) at `rate` -> checked mono (S',) at `sampling_rate`."""
    if samples.shape[0] == 0:
        raise AudioDecodeError("the audio has no samples", "empty_audio")
    seconds = samples.shape[0] / rate
    if max_seconds is not None and seconds > max_seconds:  # before resampling: no work spent on what is refused
        raise AudioDecodeError(f"{seconds:.1f} s of audio is over the limit of {max_seconds:g} s", "audio_too_long")
    mono = resample(samples.mean(axis=1), rate, sampling_rate)
    if not np.isfinite(mono).all():
        raise AudioDecodeError("the audio contains NaN or infinite samples")
    return np.ascontiguousarray(mono, dtype=np.float32)


def decode_audio(data: bytes, sampling_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Audio file bytes (WAV, FLAC, OGG/Vorbis/Opus, MP3: whatever libsndfile reads, sniffed from the bytes) ->
    mono float32 (S,) at `sampling_rate`. Raises `AudioDecodeError`."""
    import soundfile as sf

    if not data:
        raise AudioDecodeError("the audio is empty (0 bytes)", "empty_audio")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            # Read no more than the limit allows (plus one frame, to know it is over): a few MB of FLAC can hold days
            # of silence, which read whole would take tens of GB before the length check.
            cap = -1 if max_seconds is None else int(math.ceil(max_seconds * rate)) + 1
            samples = f.read(frames=cap, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError subclasses
        reason = str(e).rpartition(">: ")[2] or type(e).__name__  # drop "Error opening <_io.BytesIO at 0x...>: "
        raise AudioDecodeError(f"the audio could not be decoded: {reason} (supported: WAV, FLAC, OGG/Vorbis/Opus, "
                               "MP3)") from None
    if rate <= 0:
        raise AudioDecodeError(f"the audio's sample rate is {rate} Hz")
    if cap > 0 and samples.shape[0] >= cap:
        seconds = f"{f.frames / rate:.1f} s of audio" if f.frames > samples.shape[0] else "the audio"
        raise AudioDecodeError(f"{seconds} is over the limit of {max_seconds:g} s", "audio_too_long")
    return _finish(samples, rate, sampling_rate, max_seconds)


def load_audio_file(path: str | Path, sampling_rate: int) -> np.ndarray:
    """An audio file on disk -> mono float32 (S,) at `sampling_rate`. Read with lhotse, which also handles the
    formats libsndfile does not (through its audio backends). Raises `AudioDecodeError`."""
    from lhotse import Recording

    try:
        rec = Recording.from_file(str(path))
        samples = rec.load_audio().T  # (C, S) -> (S, C)
    except Exception as e:  # lhotse raises per backend; the file is what matters to the caller
        raise AudioDecodeError(f"{path}: the audio could not be read ({e})") from None
    return _finish(samples.astype(np.float32), rec.sampling_rate, sampling_rate, None)
