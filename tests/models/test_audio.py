"""The one audio decoder (models/audio.py) that shards, HTTP requests and importers share."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from models.audio import AudioDecodeError, decode_audio, load_audio_file


def _wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_stereo_8k_becomes_mono_at_the_rate_asked_for(tmp_path):
    t = np.arange(8000) / 8000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    data = _wav(np.stack([left, right], axis=1), 8000)
    out = decode_audio(data, 16000)
    assert out.dtype == np.float32 and out.shape == (16000,)
    assert np.abs(out).max() == pytest.approx(0.25, abs=0.02)  # the channels averaged
    (tmp_path / "a.wav").write_bytes(data)
    np.testing.assert_allclose(load_audio_file(tmp_path / "a.wav", 16000), out, atol=1e-4)
    assert decode_audio(data, 8000).shape == (8000,)  # the caller's rate, not a fixed 16 kHz


@pytest.mark.parametrize("data, code", [(b"", "empty_audio"), (b"RIFF not really a wave file", "invalid_audio"),
                                        (_wav(np.zeros((0, 1)), 16000), "empty_audio"),
                                        (_wav(np.full((800, 1), np.nan), 16000, "FLOAT"), "invalid_audio")])
def test_unusable_audio_raises_with_a_reason(data, code):
    with pytest.raises(AudioDecodeError) as e:
        decode_audio(data, 16000)
    assert e.value.code == code


def test_too_long_audio_is_refused_before_resampling():
    data = _wav(np.zeros((44100 * 3, 1)), 44100)
    with pytest.raises(AudioDecodeError, match="3.0 s of audio is over the limit of 2 s") as e:
        decode_audio(data, 16000, max_seconds=2)
    assert e.value.code == "audio_too_long"


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"nope")
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        load_audio_file(bad, 16000)


def test_a_compressed_file_of_hours_is_refused_without_decoding_it_whole():
    """A decompression bomb: 2 h of FLAC silence is ~0.4 MB, 460 MB as float32 samples. Decoding stops one frame past
    the limit (found by the fuzzing of the chat API's audio parts)."""
    import io
    import tracemalloc

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 7200, dtype=np.float32), 16000, format="FLAC")
    assert len(buf.getvalue()) < 2_000_000
    tracemalloc.start()
    try:
        with pytest.raises(AudioDecodeError, match="7200.0 s of audio is over the limit of 2 s") as e:
            decode_audio(buf.getvalue(), 16000, max_seconds=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.code == "audio_too_long" and peak < 20_000_000
