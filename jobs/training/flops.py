"""Model FLOPs of training steps, and model FLOPs utilisation (MFU): how close a run is to the hardware.

Counted, not taken from a rule of thumb: torch's `FlopCounterMode` measures the forward FLOPs of the LM at three
sequence lengths and of the speech path (encoder + adapter) at three clip lengths, once per worker at start-up.
Each is a quadratic in its length (linear layers grow with it, attention with its square), so three points give
the exact curve, and any batch's forward FLOPs follow from its rows' lengths and its clips' lengths. Training
FLOPs are 3x forward (backward ~2x forward), the convention behind MFU as PaLM defined it (model FLOPs: no
recomputation counted, frozen weights counted as if trained).

MFU = model FLOPs per second / the devices' peak dense bf16 FLOPs. The peak comes from the device's name
(`PEAK_BF16_TFLOPS`) or the recipe (`train.peak_tflops`); without one, MFU is not logged (CPU runs).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOPS, by a substring of
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("V100", 125.0),
]


def peak_flops_per_s(device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device; None on CPU or an unknown GPU without an override."""
    import torch

    if override_tflops:
        return override_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def _quadratic(xs: list[int], ys: list[float]) -> tuple[float, float, float]:
    c2, c1, c0 = np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), 2)
    return float(c0), float(c1), float(c2)


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of a SpeechLM as curves: `lm(n)` for a sequence of n positions, `speech(s)` for a clip of s
    samples (encoder and adapter)."""

    lm_coef: tuple[float, float, float]
    speech_coef: tuple[float, float, float]

    def lm(self, positions: int) -> float:
        c0, c1, c2 = self.lm_coef
        return c0 + c1 * positions + c2 * positions ** 2

    def speech(self, samples: int) -> float:
        c0, c1, c2 = self.speech_coef
        return max(0.0, c0 + c1 * samples + c2 * samples ** 2)

    def train_step(self, batch: dict) -> float:
        """Model FLOPs (forward + backward) of one micro-batch of the processor's tensors."""
        rows = batch["attention_mask"].sum(dim=1).tolist()
        clips = batch["audio_lens"].tolist() if batch.get("audio_lens") is not None else []
        return 3.0 * (sum(self.lm(n) for n in rows) + sum(self.speech(s) for s in clips))


def flop_counter():
    """torch's `FlopCounterMode`, also counting the CPU attention kernel: torch counts the CUDA ones but not
    `_scaled_dot_product_flash_attention_for_cpu`; the same formula for it (no causal discount, as for the others)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})


def count_forward_flops(model, lm_lengths=(32, 64, 128), clip_seconds=(1.0, 2.0, 3.0)) -> ForwardFlops:
    """Measure `model`'s forward FLOPs (see the module docstring); a few small forward passes, no gradients."""
    import torch

    def measure(fn) -> float:
        counter = flop_counter()
        with torch.no_grad(), counter:
            fn()
        return float(counter.get_total_flops())

    # eval mode: no dropout randomness (the RNG stream of an exact resume stays untouched) and no BatchNorm
    # statistics updated by these dummy inputs
    was_training = model.training
    model.eval()
    try:
        return _count(model, lm_lengths, clip_seconds, measure)
    finally:
        model.train(was_training)


def _count(model, lm_lengths, clip_seconds, measure) -> ForwardFlops:
    import torch

    device = model.device
    width = model.lm.get_input_embeddings().embedding_dim
    dtype = model.lm.get_input_embeddings().weight.dtype
    lm = [measure(lambda n=n: model.lm(inputs_embeds=torch.zeros(1, n, width, device=device, dtype=dtype),
                                       attention_mask=torch.ones(1, n, dtype=torch.long, device=device)))
          for n in lm_lengths]
    rate = model.config.sampling_rate
    samples = [int(s * rate) for s in clip_seconds]
    speech = [measure(lambda s=s: model.encode_audio(torch.zeros(1, s, device=device),
                                                     torch.tensor([s], device=device)))
              for s in samples]
    return ForwardFlops(_quadratic(list(lm_lengths), lm), _quadratic(samples, speech))
