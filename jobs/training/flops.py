"""Model FLOPs of training steps, and model FLOPs utilisation (MFU): how close a run is to the hardware.

Counted, not taken from a rule of thumb: torch's `FlopCounterMode` measures the forward FLOPs of the LM at three
sequence lengths and of the speech path (encoder + adapter) at three clip lengths, once per worker at start-up.
Each is a quadratic in its length (linear layers grow with it, attention with its square), so three points give
the exact curve, and any batch's forward FLOPs follow from its rows' lengths and its clips' lengths.

Training FLOPs are the FLOPs the step really does (no recomputation counted): a part whose weights train does
its forward, the gradient of its input and the gradient of its weights (3x forward); a frozen part that a gradient
must pass through to reach a trained part before it does forward and input gradient (2x); a frozen part with
nothing trainable before it, forward only (1x). So the LM with LoRA counts 2x (its base weights get no gradient;
LoRA's own share is small), a frozen LM 2x on audio batches whose encoder or adapter trains and 1x on text batches.
PaLM's convention (3x everything) would inflate MFU by up to 1.5x for this model family.

The LM head is counted where it runs: training projects only the positions that predict a label onto the
vocabulary (`models.loss`), so a step counts the LM's layers at every position and the head at the label positions
only. With a 256k vocabulary the head is most of a small LM's per-position FLOPs, and an ASR batch has labels at
5-20% of its positions: counting it everywhere would overstate MFU several times over.

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
    """Forward FLOPs of a SpeechLM as curves: `lm(n)` for a sequence of n positions, `encoder(s)` and `adapter(s)`
    for a clip of s samples; and which parts train (`encoder_trains`, `adapter_trains`, `lm_mode`)."""

    lm_coef: tuple[float, float, float]
    encoder_coef: tuple[float, float, float]
    adapter_coef: tuple[float, float, float]
    head: float = 0.0
    """Forward FLOPs of the LM head (output projection) at one position; included in `lm(n)`."""
    encoder_trains: bool = True
    adapter_trains: bool = True
    lm_mode: str = "lora"

    @staticmethod
    def _curve(coef: tuple[float, float, float], x: int) -> float:
        c0, c1, c2 = coef
        return max(0.0, c0 + c1 * x + c2 * x ** 2)

    def lm(self, positions: int) -> float:
        """The LM's forward with the head at every position (as generation's prefill runs it)."""
        return self._curve(self.lm_coef, positions)

    def lm_layers(self, positions: int) -> float:
        """The LM's forward without its head."""
        return max(0.0, self.lm(positions) - self.head * positions)

    def encoder(self, samples: int) -> float:
        return self._curve(self.encoder_coef, samples)

    def adapter(self, samples: int) -> float:
        return self._curve(self.adapter_coef, samples)

    def speech(self, samples: int) -> float:
        return self.encoder(samples) + self.adapter(samples)

    def passes(self, with_audio: bool) -> dict[str, int]:
        """Forward-pass equivalents per part (see the module docstring) for a batch with or without audio."""
        def factor(trains: bool, grad_from_before: bool) -> int:
            return 3 if trains else 2 if grad_from_before else 1

        encoder = factor(self.encoder_trains, False)
        adapter = factor(self.adapter_trains, self.encoder_trains)
        speech_trains = with_audio and (self.encoder_trains or self.adapter_trains)
        lm = 3 if self.lm_mode == "full" else 2 if self.lm_mode == "lora" else factor(False, speech_trains)
        return {"encoder": encoder, "adapter": adapter, "lm": lm}

    def train_step(self, batch: dict) -> float:
        """Model FLOPs (forward + backward) of one micro-batch of the processor's tensors (on the host)."""
        from models.loss import IGNORE_INDEX

        rows = batch["attention_mask"].sum(dim=1).tolist()
        clips = batch["audio_lens"].tolist() if batch.get("audio_lens") is not None else []
        labels = batch.get("labels")
        # positions whose next token is a label: the ones `models.loss` projects onto the vocabulary
        head_positions = int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels is not None else sum(rows)
        k = self.passes(with_audio=bool(clips))
        return (k["lm"] * (sum(self.lm_layers(n) for n in rows) + self.head * head_positions)
                + sum(k["encoder"] * self.encoder(s) + k["adapter"] * self.adapter(s) for s in clips))


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
    encoder = [measure(lambda s=s: model.encoder(torch.zeros(1, s, device=device), torch.tensor([s])))
               for s in samples]
    speech = [measure(lambda s=s: model.encode_audio(torch.zeros(1, s, device=device), torch.tensor([s])))
              for s in samples]
    head = measure(lambda: model.lm.get_output_embeddings()(torch.zeros(1, 1, width, device=device, dtype=dtype)))
    cfg = model.config
    return ForwardFlops(_quadratic(list(lm_lengths), lm), _quadratic(samples, encoder),
                        _quadratic(samples, [b - a for a, b in zip(encoder, speech)]), head=head,
                        encoder_trains=cfg.encoder.train, adapter_trains=cfg.adapter.train, lm_mode=cfg.lm.mode)
