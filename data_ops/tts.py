"""Text-to-speech engines for demo data and mixed-modal SFT. Pluggable: anything with `synthesize(text, rng)`.

The default, `EspeakTTS`, shells out to Debian's `espeak-ng` (no weights, no network) and varies voice, rate and
pitch per sample so that synthetic speech is not one fixed voice. Output is resampled to 16 kHz mono with
lhotse's resampler.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from data_ops.schema import load_audio_16k


# espeak-ng voices per language; "+f3"/"+m2" are its voice variants (timbre).
ESPEAK_VOICES: dict[str, tuple[str, ...]] = {
    "en": ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m2", "en-gb-x-rp+f2"),
    "de": ("de", "de+f3", "de+m3"),
    "es": ("es", "es+f3", "es+m3"),
    "fr": ("fr", "fr+f3", "fr+m3"),
}


# Voices held out of training (the last one per language): the evaluation split speaks with these only, so a test
# of "new voices" is one.
HELD_OUT_VOICES: dict[str, tuple[str, ...]] = {lang: (v[-1],) for lang, v in ESPEAK_VOICES.items()}
TRAIN_VOICES: dict[str, tuple[str, ...]] = {lang: v[:-1] for lang, v in ESPEAK_VOICES.items()}


class TTSError(RuntimeError):
    pass


class TTSEngine(Protocol):
    def synthesize(self, text: str, lang: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
        """Speak `text` in `lang`; return 16 kHz mono float32 samples (S,) and what was chosen (voice, ...)."""
        ...


@dataclasses.dataclass
class EspeakTTS:
    """espeak-ng with per-sample voice, rate (words/min) and pitch (0-99) drawn from the given ranges."""

    voices: dict[str, Sequence[str]] = dataclasses.field(default_factory=lambda: dict(ESPEAK_VOICES))
    rate: tuple[int, int] = (140, 190)
    pitch: tuple[int, int] = (30, 70)
    binary: str = "espeak-ng"

    def __post_init__(self) -> None:
        if shutil.which(self.binary) is None:
            raise TTSError(
                f"{self.binary} is not installed; install it with `apt-get install espeak-ng` "
                "(infra/install.sh does this when run as root)"
            )

    def synthesize(self, text: str, lang: str, rng: np.random.Generator,
                   voice: str | None = None) -> tuple[np.ndarray, dict]:
        if not text.strip():
            raise TTSError("cannot synthesize empty text")
        if voice is None:
            if lang not in self.voices:
                raise TTSError(f"no espeak-ng voice configured for language {lang!r}; known: {sorted(self.voices)}")
            voice = str(rng.choice(list(self.voices[lang])))
        rate = int(rng.integers(self.rate[0], self.rate[1] + 1))
        pitch = int(rng.integers(self.pitch[0], self.pitch[1] + 1))
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "tts.wav"
            # Text goes through stdin, never the command line: it may start with '-' or be long.
            proc = subprocess.run(
                [self.binary, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(wav), "--stdin"],
                input=text.encode("utf-8"), capture_output=True, timeout=120,
            )
            if proc.returncode != 0 or not wav.exists():
                raise TTSError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace')[:500]}")
            audio = load_audio_16k(wav)
        return audio, {"engine": "espeak-ng", "voice": voice, "rate": rate, "pitch": pitch}


class SpeakMapper:
    """Ray Data callable class: rows {id, text, lang, seed} -> the same rows plus `audio` (float32 bytes, 16 kHz),
    `tts` (JSON of the engine's choices) and `error` (None, or why this row has no audio). One engine per actor."""

    def __init__(self, tts_factory=EspeakTTS):
        self.tts = tts_factory()

    def __call__(self, batch: dict) -> dict:
        import json

        audio, meta, error = [], [], []
        for text, lang, seed in zip(batch["text"], batch["lang"], batch["seed"]):
            try:
                samples, info = self.tts.synthesize(str(text), str(lang), np.random.default_rng(int(seed)))
                audio.append(samples.astype("<f4").tobytes())
                meta.append(json.dumps(info))
                error.append(None)
            except TTSError as e:
                audio.append(None)
                meta.append(None)
                error.append(str(e))
        return {**batch, "audio": audio, "tts": meta, "error": error}
