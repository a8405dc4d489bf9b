"""Log-mel features computed on the model's device, inside the model, from 16 kHz waveforms.

Why not call the transformers feature extractors directly: `ParakeetFeatureExtractor.__call__` pads and
pre-emphasises on the CPU and leaves its input there, and `WhisperFeatureExtractor` takes numpy; both would
move audio through the host every step. These modules reproduce their math (tests compare against them) on
tensors already on the device, batched, with exact valid lengths.

Their filterbank and window are computed buffers: they stay fp32 when the model moves to bf16
(`models.precision.KeepComputedBuffers`).

Legend: B batch of audio segments, S samples, T feature frames, F mel bins.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from models.precision import KeepComputedBuffers

LOG_ZERO_GUARD = 2.0**-24  # NeMo / ParakeetFeatureExtractor
NORM_EPS = 1e-5


class FastConformerFeatures(KeepComputedBuffers):
    """NeMo-style features (as `ParakeetFeatureExtractor`): pre-emphasis 0.97, 25 ms Hann window, 10 ms hop,
    512-point FFT, slaney mel, natural log, then per-utterance per-bin mean/variance normalisation over valid
    frames only.
    """

    def __init__(self, n_mels: int = 80, sampling_rate: int = 16000, n_fft: int = 512, win_length: int = 400,
                 hop_length: int = 160, preemphasis: float = 0.97):
        super().__init__()
        self.n_fft, self.win_length, self.hop_length, self.preemphasis = n_fft, win_length, hop_length, preemphasis
        fb = mel_filter_bank(
            num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
            max_frequency=sampling_rate / 2, sampling_rate=sampling_rate, norm="slaney", mel_scale="slaney",
        ).astype(np.float32)
        # Buffers, not parameters; not persistent, so checkpoints hold only learned weights.
        self.register_buffer("mel_fb", torch.from_numpy(np.ascontiguousarray(fb.T)), persistent=False)
        self.register_buffer("window", torch.hann_window(win_length, periodic=False), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, S) float, audio_lens (B,) -> features (B, T, F), feature_lens (B,)."""
        audio = audio.float()
        s_idx = torch.arange(audio.shape[1], device=audio.device)
        valid = s_idx[None, :] < audio_lens[:, None]
        x = torch.cat([audio[:, :1], audio[:, 1:] - self.preemphasis * audio[:, :-1]], dim=1)
        x = x.masked_fill(~valid, 0.0)
        spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window, return_complex=True, pad_mode="constant")
        power = spec.real.pow(2) + spec.imag.pow(2)
        mel = torch.log(self.mel_fb @ power + LOG_ZERO_GUARD).transpose(1, 2)  # (B, T, F)
        feat_lens = torch.div(audio_lens, self.hop_length, rounding_mode="floor")
        mask = (torch.arange(mel.shape[1], device=mel.device)[None, :] < feat_lens[:, None]).unsqueeze(-1)
        n = feat_lens.clamp(min=1).unsqueeze(-1).to(mel.dtype)
        mean = (mel * mask).sum(1) / n
        var = (((mel - mean.unsqueeze(1)) * mask) ** 2).sum(1) / (n - 1).clamp(min=1)
        mel = (mel - mean.unsqueeze(1)) / (var.sqrt().unsqueeze(1) + NORM_EPS)
        return mel * mask, feat_lens


class WhisperFeatures(KeepComputedBuffers):
    """Whisper's features (as `WhisperFeatureExtractor`): 400-point FFT, 10 ms hop, slaney mel to 8 kHz, log10,
    floor at (max - 8), then (x + 4) / 4. Input is one fixed window per row (Whisper needs exactly 30 s)."""

    def __init__(self, n_mels: int = 80, sampling_rate: int = 16000, n_fft: int = 400, hop_length: int = 160):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        fb = mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
            sampling_rate=sampling_rate, norm="slaney", mel_scale="slaney",
        )
        self.register_buffer("mel_fb", torch.from_numpy(np.ascontiguousarray(fb.T)).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.hop_length)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (B, S_window) -> features (B, F, T_window) (Whisper's channel-first layout)."""
        spec = torch.stft(windows.float(), self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = (spec[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(self.mel_fb @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - 8.0)
        return (log_spec + 4.0) / 4.0
