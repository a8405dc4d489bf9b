"""The memory plan of a recipe before launch: per worker (per GPU), what one training step holds, and which common
GPU sizes it fits. `jobs.train --check` prints it.

    weights, their bf16 casts (autocast), gradients, Adam's two fp32 states, DDP's gradient buckets, activations of
    the recipe's largest micro-batch (with and without activation checkpointing; under a type's batch budget, the
    largest the budget allows), the answer-only loss's chunk of logits, the CUDA context; host RAM per worker

Everything is computed from shapes: parameter counts by module and the widths come from the model built without its
weights (`models.skeleton`: nothing read or allocated, so the paper's 3B model costs nothing), activations from them
(`lm_layer`, `fastconformer_layer`, `conformer_layer`, ... below: per token, or per encoder frame, per layer, in
bytes) times the batch's positions. It is an estimate, checked against measured CPU steps of three sizes by
`bench/memory_plan.py` (within 25% there, fp32); bf16 byte counts follow the same tensor lists with autocast's
dtypes and are not measured here (no GPU in the suite).

What it is not: a profiler. It does not see allocator fragmentation (the margin is for that), NCCL's buffers beyond a
constant, or kernels that keep more than the tensors autograd saves.

Legend: h hidden width, I MLP width, qd query heads x head dim, r LoRA rank, T frames of the longest clip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from models.skeleton import ModelShapes

GIB = 2**30
GPU_SIZES_GB = (24, 40, 48, 80, 141)
MARGIN = 0.10
"""Fits: the plan is at most 90% of the GPU's memory (allocator fragmentation; the estimate's own error)."""
CUDA_CONTEXT_BYTES = 1.5e9
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers on a GPU (docs: gpu-readiness.md, ~1.5 GB)."""
CPU_RUNTIME_BYTES = 40 * 2**20
"""On the CPU, what the first training step leaves allocated besides the model's tensors (oneDNN's primitive caches,
the autograd engine's threads and their malloc arenas): ~40 MiB whatever the model's size, measured by
bench/memory_plan.py (torch 2.13). The CPU's counterpart of the CUDA context."""
HOST_RUNTIME_BYTES = 3 * GIB
"""A Ray Train worker's Python, torch, transformers and prefetched batches, besides the model it builds."""
TURN_TOKENS = 4
"""Chat-template tokens per turn (role markers, end of turn) added to a conversation's own text."""


@dataclass(frozen=True)
class Mode:
    """How a step computes: `autocast` (bf16 autocast, else fp32 throughout) and `frozen_bf16` (weights that do not
    train held in bf16: models.precision.cast_frozen_weights)."""

    autocast: bool = False
    frozen_bf16: bool = False

    @property
    def act(self) -> int:  # bytes of a matmul's output: bf16 under autocast
        return 2 if self.autocast else 4


@dataclass(frozen=True)
class BatchShape:
    """The largest micro-batch of one data type: `batch_size` samples of `positions` LM positions each, of which
    `audio_s` seconds of audio per sample. Under a batch budget the counts are the budget's share of the longest
    sample (budget / longest) and may be fractional: count x longest is then the budget, which bounds every batch
    the budget lets through (count x its longest <= budget), and count x longest^2 bounds the attention terms that
    grow with a clip's length squared."""

    data_type: str
    batch_size: float
    positions: int
    audio_s: float = 0.0
    label_tokens: int | None = None
    """Positions with a label in the batch; None: every position may carry one (text SFT can)."""
    audio_batch: float | None = None
    """Clips of `audio_s` in the batch, for the encoder and the adapter; None: `batch_size`. (An audio budget bounds
    the batch's audio, not its text: with one alone the LM still sees `batch_size` samples.)"""


# ----------------------------------------------------------------------------------------------------------------
# Activations per token (LM) or per encoder frame (encoder, adapter), per layer, in bytes
#
# Method: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1)
# count the tensors autograd saves for the backward in a GPT layer: 34*s*b*h bytes + 5*a*s^2*b in 16 bits, i.e.
# each matmul's and nonlinearity's input, the norms' inputs, the attention scores. Here the same count is redone for
# each layer this model has, as transformers and models/speechlm.py write them: gated MLPs of width I (four I-wide
# tensors: gate out = GELU input, GELU out, up out, their product = down_proj input, vs GPT's two 4h ones), RMS/
# LayerNorms, fused attention (SDPA keeps q, k, v and its output, not the s^2 scores) except where a layer passes an
# attention bias that needs a gradient (FastConformer's relative positions: heads x T per frame), k and v repeated
# to every query head (transformers repeats them whenever a padding mask is passed), and the copies autocast makes:
# a tensor in fp32 entering a bf16 matmul is cast once per consuming linear (autocast caches casts of weights, not
# of activations), and PEFT casts each LoRA input to the LoRA weights' fp32 first, so under autocast every LoRA
# linear saves a bf16 copy of its input of its own. Norms compute in fp32 (Gemma/Llama RMSNorm upcast; autocast
# runs LayerNorm in fp32): their saved inputs are 4 bytes whatever the mode.
# ----------------------------------------------------------------------------------------------------------------


def lm_layer(lm: dict, mode: Mode, trains_lm: bool) -> float:
    """Bytes saved per token by one decoder layer (Gemma/Llama/Qwen: RMSNorm, q/k/v/o, gated MLP)."""
    h, i, q, a = lm["hidden"], lm["intermediate"], lm["q_dim"], mode.act
    n_lora = len(lm["lora_in"])
    norms_in = 2 * 4 * h  # each RMSNorm keeps its fp32 input
    if not mode.autocast:
        norm_out = 2 * 4 * h  # one fp32 output each, shared by its linears and their LoRA
        lora_copies = 0.0
    else:
        # consumers of the attention norm: q, k, v (+ their LoRA); of the MLP norm: gate, up (+ LoRA)
        base = 5 if not mode.frozen_bf16 else 2  # fp32 norm output cast per base linear; bf16 output shared
        norm_out = 2 * h * base
        lora_copies = 2 * sum(lm["lora_in"])  # each LoRA linear: its own bf16 copy of its input
    attention = a * 5 * q  # q, k and v (repeated to q_dim), SDPA's output, o_proj's contiguous input
    mlp = a * 4 * i
    lora = a * n_lora * lm["lora_r"]
    # a frozen LM (no LoRA, not full) still saves the same inputs whenever a trainable part lies below it (the
    # adapter's gradient flows through every layer); for text-only batches it saves nothing, which this ignores
    del trains_lm
    return norms_in + norm_out + lora_copies + attention + mlp + lora


def lm_other(lm: dict, mode: Mode) -> float:
    """Per token, outside the layers: embeddings (with the audio written in), the final norm's input and output."""
    return 4 * lm["hidden"] + 4 * lm["hidden"] + mode.act * lm["hidden"]


def fastconformer_layer(enc: dict, frames: int, mode: Mode) -> float:
    """Bytes per encoder frame of one FastConformer block (transformers' ParakeetEncoderBlock), the longest clip
    being `frames` frames: five LayerNorms' fp32 inputs and four outputs; two FFNs (I-wide linear output = SiLU
    input, SiLU output); attention: q+bias_u, q+bias_v, k, v, the relative-position keys (2T-1 positions: 2h per
    frame), SDPA's output and o_proj's input, and the relative-position bias that SDPA gets as a mask and must
    differentiate (heads x T per frame); convolution module: pointwise output (2h, GLU input), the masked GLU output,
    depthwise output, BatchNorm output, SiLU output."""
    h, i, a = enc["hidden"], enc["intermediate"], mode.act
    norms = 5 * 4 * h + 4 * 4 * h
    casts = 2 * 6 * h if mode.autocast else 0  # LN outputs cast for ff1, q, k, v, pointwise_conv1, ff2
    ffn = a * 2 * 2 * i
    attention = a * 8 * h + a * enc["heads"] * frames
    conv = a * 6 * h
    drop = (2 * i + 3 * h) * 1 if enc["dropout"] > 0 else 0  # bool masks of the FFNs' and attention's dropouts
    return norms + casts + ffn + attention + conv + drop


def fastconformer_front(enc: dict, mode: Mode) -> float:
    """Per encoder frame: the subsampling convolutions (not checkpointed: transformers checkpoints the blocks only).
    Per output frame there are s mel frames; conv k keeps C * F * s / 4^k values (frequency and time halved at each
    stride-2 conv): the first ReLU's output, then for every later stage the depthwise output (pointwise input) and
    the ReLU output; the mel input (the first conv's weight gradient) and the flattened input of the final linear;
    and the shared relative-position embeddings (2T-1 positions: 2h per frame)."""
    s, f, c, a = enc["subsampling"], enc["mels"], enc["channels"], mode.act
    n = int(math.log2(s))
    size = [c * f * s / 4**k for k in range(1, n + 1)]
    return a * (s * f + size[0] + 2 * sum(size[1:]) + size[-1]) + 4 * 2 * enc["hidden"]


def whisper_layer(enc: dict, mode: Mode) -> float:
    """Per 20 ms frame of one Whisper encoder layer: two LayerNorms (fp32 input and output), q, k, v, SDPA output,
    out_proj input, fc1 output (GELU input), GELU output."""
    h, i, a = enc["hidden"], enc["intermediate"], mode.act
    return 2 * 4 * h + 2 * 4 * h + (2 * 4 * h if mode.autocast else 0) + a * (5 * h + 2 * i)


def whisper_front(enc: dict, mode: Mode) -> float:
    """Per 20 ms frame: mel input (2 frames), conv1's output (2h, GELU input) and GELU output, conv2's, positions."""
    return mode.act * (2 * enc["mels"] + 7 * enc["hidden"])


def _whisper_frames(enc_frames: int) -> int:
    return math.ceil(enc_frames / 1500) * 1500  # every 30 s window is padded whole


# Per encoder kind (the widths are `models.skeleton.ENCODER_WIDTHS`'): (enc, frames of the longest clip, mode) ->
# (bytes per frame of one layer, bytes per frame of the front end, frames a clip occupies)
ENCODER_ACTIVATIONS = {
    "fastconformer": lambda enc, t, mode: (fastconformer_layer(enc, t, mode), fastconformer_front(enc, mode), t),
    "whisper": lambda enc, t, mode: (whisper_layer(enc, mode), whisper_front(enc, mode), _whisper_frames(t)),
}


def conformer_layer(ad: dict, mode: Mode) -> float:
    """Per adapter frame of one `models.speechlm.ConformerLayer`: six LayerNorms' fp32 inputs and five outputs; two
    FFNs (m*H-wide linear output = SiLU input, SiLU output); qkv (3H), SDPA output, attn_out's input; pointwise_in
    output (GLU input), masked GLU output, SiLU output; dropout masks when dropout is on."""
    hh, m, a = ad["hidden"], ad["ff_mult"], mode.act
    norms = 6 * 4 * hh + 5 * 4 * hh
    casts = 2 * 5 * hh if mode.autocast else 0
    drop = (2 * m * hh + 4 * hh) if ad["dropout"] > 0 else 0
    return norms + casts + a * (4 * m * hh + 8 * hh) + drop


def activations(shapes: ModelShapes, batch: BatchShape, mode: Mode, checkpointing: bool,
                sampling_rate: int = 16000) -> dict[str, float]:
    """Activation bytes of one micro-batch: lm, encoder, adapter, backward (gradient buffers in flight)."""
    lm, enc, ad = shapes.lm, shapes.encoder, shapes.adapter
    tokens = batch.batch_size * batch.positions
    residual_lm = 2 if mode.frozen_bf16 else 4  # the residual stream: the embeddings' dtype
    per_layer = lm_layer(lm, mode, shapes.trainable["lm"] + shapes.trainable["lora"] > 0)
    if checkpointing:  # every layer keeps its input; one layer at a time is recomputed, whole, in the backward
        lm_bytes = tokens * (lm["layers"] * residual_lm * lm["hidden"] + per_layer)
    else:
        lm_bytes = tokens * lm["layers"] * per_layer
    lm_bytes += tokens * lm_other(lm, mode)
    # the backward's own buffers: the gradient of the widest tensors of the layer being differentiated (the MLP's
    # gate/up/product gradients, I wide) and of the residual stream
    backward = tokens * (3 * mode.act * lm["intermediate"] + 2 * 4 * lm["hidden"])
    out = {"lm": lm_bytes, "encoder": 0.0, "adapter": 0.0, "backward": backward}
    if batch.audio_s <= 0:
        return out
    enc_frames, positions = shapes.frames(int(batch.audio_s * sampling_rate))
    n = batch.batch_size if batch.audio_batch is None else batch.audio_batch
    trains_below = shapes.trainable["encoder"] > 0
    if enc["kind"] not in ENCODER_ACTIVATIONS:
        raise ValueError(f"no activation count for encoder kind {enc['kind']!r} (jobs.training.memory_plan."
                         "ENCODER_ACTIVATIONS)")
    layer, front, frames = ENCODER_ACTIVATIONS[enc["kind"]](enc, enc_frames, mode)
    frames *= n
    if trains_below:
        enc_layers = (enc["layers"] * 4 * enc["hidden"] + layer) if checkpointing else enc["layers"] * layer
        out["encoder"] = frames * (enc_layers + front)
    # a frozen encoder keeps nothing for the backward; the adapter's input is its output
    ad_frames = n * positions
    if shapes.trainable["adapter"] > 0:
        ad_layer = conformer_layer(ad, mode)
        layers = (ad["layers"] * 4 * ad["hidden"] + ad_layer) if checkpointing else ad["layers"] * ad_layer
        out["adapter"] = ad_frames * (layers + 4 * (ad["in_dim"] + ad["hidden"]))
    out["backward"] += frames * 3 * mode.act * enc["intermediate"] if trains_below else 0
    return out


def loss_bytes(shapes: ModelShapes, batch: BatchShape, mode: Mode, chunk: int) -> float:
    """The answer-only loss (models.loss): one chunk of at most `chunk` label positions is projected onto the
    vocabulary at a time, in the forward and again in its backward: the fp32 logits, cross-entropy's log-softmax and
    their gradient (3 x 4 bytes a value), plus the head's bf16 output and, with fp32 weights, the head weight's bf16
    cast under autocast."""
    labels = batch.batch_size * batch.positions if batch.label_tokens is None else batch.label_tokens
    k = min(chunk, labels)
    v, h = shapes.lm["vocab"], shapes.lm["hidden"]
    per = 12 + (2 if mode.autocast else 0)
    cast = 2 * v * h if mode.autocast and not mode.frozen_bf16 else 0
    return k * v * per + cast


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Bytes per worker. `fixed`: what every step holds whatever the batch; `batches`: per data type, the largest
    micro-batch's activations and loss without (`off`) and with (`on`) activation checkpointing."""

    fixed: dict[str, float]
    batches: dict[str, dict]
    host_ram: float
    gpu: bool = True

    def peak(self, checkpointing: bool) -> float:
        key = "on" if checkpointing else "off"
        return sum(self.fixed.values()) + max((b[key] for b in self.batches.values()), default=0.0)

    def fits(self, checkpointing: bool) -> list[int]:
        """The GPU sizes (GB, read as GiB) the plan fits with the margin."""
        return [g for g in GPU_SIZES_GB if self.peak(checkpointing) <= (1 - MARGIN) * g * GIB]


def fixed_bytes(shapes: ModelShapes, mode: Mode, strategy: str, world: int, gpu: bool = True) -> dict[str, float]:
    """Weights (trainable fp32; frozen fp32, or bf16 with `frozen_bf16`), autocast's bf16 casts of the weights kept
    for the backward, fp32 gradients of the trainable ones, Adam's exp_avg and exp_avg_sq (fp32), DDP's buckets (a
    second copy of the gradients, with more than one worker), and under FSDP everything sharded over the workers
    plus the units gathered in full at once (the root, kept through the step, and two layers: the one computing,
    the one prefetched)."""
    total, train = shapes.total, sum(shapes.trainable.values())
    frozen = total - train
    weights = 4 * train + (2 if mode.frozen_bf16 else 4) * frozen
    # autocast casts every matmul weight to bf16 and the backward keeps the cast (not the embedding: a lookup);
    # weights already in bf16 need none
    casts = 0.0
    if mode.autocast:
        casts = 2 * (train if mode.frozen_bf16 else total - shapes.lm_embedding)
    out = {"weights": weights, "weight casts": casts, "gradients": 4.0 * train, "optimizer": 8.0 * train}
    if strategy == "fsdp" and world > 1:
        for k in ("weights", "gradients", "optimizer"):
            out[k] /= world
        gathered_bytes = 2 if mode.autocast else 4  # MixedPrecisionPolicy gathers bf16 under autocast
        out["weight casts"] = gathered_bytes * (shapes.root_unit + 2 * shapes.largest_unit)
        out["ddp buckets"] = 0.0
    else:
        out["ddp buckets"] = 4.0 * train if world > 1 else 0.0
    out["runtime"] = CUDA_CONTEXT_BYTES if gpu else CPU_RUNTIME_BYTES
    return out


def plan_memory(shapes: ModelShapes, batches: list[BatchShape], mode: Mode, *, strategy: str = "ddp",
                world: int = 1, chunk: int | None = None, gpu: bool = True, pretrained: bool = False,
                lm_pretrained: bool = False) -> Plan:
    from jobs.training.model_init import GROUP_BYTES
    from models.loss import CHUNK

    chunk = chunk or CHUNK
    per_type = {}
    for b in batches:
        loss = loss_bytes(shapes, b, mode, chunk)
        off, on = activations(shapes, b, mode, False), activations(shapes, b, mode, True)
        per_type[b.data_type] = {"shape": b, "act_off": off, "act_on": on, "loss": loss,
                                 "off": sum(off.values()) + loss, "on": sum(on.values()) + loss}
    # the worst worker is rank 0 (`jobs.training.model_init`; the others hold only their own weights, on the GPU):
    # it builds in fp32 on the host every part but a pretrained LM, whose weights it streams from the files a group
    # at a time (read, then in flight); a checkpoint is read in its own dtype first (bf16 for the paper's: ~2 bytes
    # a weight more at once)
    whole = shapes.total - (shapes.params.get("lm", 0) if lm_pretrained else 0)
    host = 4 * whole + (2 * whole if pretrained else 0) + (2 * GROUP_BYTES if lm_pretrained else 0) \
        + HOST_RUNTIME_BYTES
    return Plan(fixed_bytes(shapes, mode, strategy, world, gpu), per_type, host, gpu)


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def describe_plan(plan: Plan, mode: Mode, strategy: str, world: int, checkpointing: bool) -> str:
    """The plan as a compact table (GiB per worker)."""
    dtype = "bf16 autocast" + (", frozen weights bf16" if mode.frozen_bf16 else ", fp32 weights") \
        if mode.autocast else "fp32"
    lines = [f"memory plan per worker (GiB; {dtype}; {strategy} x {world}; estimates, +-25%):"]
    lines += [f"  {k:<34}{_gib(v)}" for k, v in plan.fixed.items() if v]
    lines.append(f"  {'fixed':<34}{_gib(sum(plan.fixed.values()))}")
    lines.append(f"  {'largest micro-batch':<34}{'ckpt off':>8}{'ckpt on':>9}")
    for t, b in plan.batches.items():
        s = b["shape"]
        audio = f", {s.audio_s:g} s audio" if s.audio_s else ""
        clips = f" ({s.audio_batch:.4g} clips in the encoder: budget)" \
            if s.audio_batch not in (None, s.batch_size) and s.audio_s else ""
        lines.append(f"  {t}: {s.batch_size:.4g} x {s.positions} positions{audio}{clips}")
        for part in ("lm", "encoder", "adapter", "backward"):
            if b["act_off"][part]:
                lines.append(f"    {'activations ' + part:<32}{_gib(b['act_off'][part])} {_gib(b['act_on'][part])}")
        lines.append(f"    {'loss (answer-only, one chunk)':<32}{_gib(b['loss'])} {_gib(b['loss'])}")
    for ckpt in (False, True):
        label = "peak, checkpointing " + ("on" if ckpt else "off") + (" (recipe)" if ckpt == checkpointing else "")
        fits = plan.fits(ckpt)
        lines.append(f"  {label:<34}{_gib(plan.peak(ckpt))}  fits: "
                     + (", ".join(f"{g} GB" for g in fits) if fits else "none of " +
                        "/".join(map(str, GPU_SIZES_GB)) + " GB") + f" (with {MARGIN:.0%} margin)")
    lines.append(f"  {'host RAM per worker':<34}{_gib(plan.host_ram)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# From a recipe
# ----------------------------------------------------------------------------------------------------------------


def run_mode(train) -> Mode:
    """The step's dtypes as the recipe's `train` section asks them: bf16 for `precision: bf16`, and for `auto` on GPU
    workers (where `models.precision.training_autocast_dtype` picks bf16 on any GPU with native bf16, which the plan
    assumes). Under autocast the training job holds the frozen weights in bf16 (jobs/training/sft.py
    `prepare_model`)."""
    autocast = train.precision == "bf16" or (train.precision == "auto" and train.use_gpu)
    return Mode(autocast=autocast, frozen_bf16=autocast)


def _text_of(conv: dict) -> tuple[str, int]:
    turns = conv.get("turns", [])
    text = " ".join(p.get("text", "") for t in turns for p in t.get("parts", []) if p.get("type") == "text")
    return text, len(turns)


def largest_batches(plan, model) -> list[BatchShape]:
    """Per sampled data type: its batch size times its largest sample. The largest sample is bounded by the
    recipe's caps where set (`data.max_sample_audio_s`, `data.max_sample_tokens`: the streams skip anything
    larger), else read from the corpora's cut manifests (one pass, no audio): the longest audio, and the longest
    text in tokens (the LM's tokenizer where the recipe names one; else its UTF-8 bytes, which bound the offline
    byte-level BPE's count) plus `TURN_TOKENS` a turn. A type's batch budget (`max_batch_tokens`,
    `max_batch_audio_s`) bounds the sample (a longer one is skipped) and the batch: at most budget / longest
    samples of the longest size (`BatchShape`), never more than its batch size."""
    from data_ops.shar_datasource import iter_cut_dicts

    d, cfg = plan.data, plan.model
    count = None
    source = cfg.lm.tokenizer or cfg.lm.pretrained
    if source:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
        count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    sampled = {t for stage in plan.stages for t in stage.sampled_types}
    out = []
    for dtype, src in d.sources.items():
        if dtype not in sampled:
            continue
        audio_s, text_tokens = 0.0, 0
        need_audio = dtype != "text" and d.max_sample_audio_s is None
        if need_audio or d.max_sample_tokens is None:
            longest, turns = "", 0
            for uri in src.uris:
                for cut in iter_cut_dicts(uri, dtype, endpoint_url=d.endpoint_url, manifest=plan.manifests.get(uri)):
                    audio_s = max(audio_s, float(cut.get("duration") or 0.0))
                    text, n = _text_of((cut.get("custom") or {}).get("conversation") or {})
                    if len(text.encode()) > len(longest.encode()):
                        longest, turns = text, n
            text_tokens = (count(longest) if count else len(longest.encode())) + TURN_TOKENS * turns
        if dtype != "text" and d.max_sample_audio_s is not None:
            audio_s = d.max_sample_audio_s
        audio_positions = model.audio_token_count(int(audio_s * cfg.sampling_rate)) if audio_s else 0
        positions = audio_positions + text_tokens
        if d.max_sample_tokens is not None:
            positions = d.max_sample_tokens
            # audio cannot take more positions than the cap either
            frame_s = audio_s / audio_positions if audio_positions else 0.0
            audio_s = min(audio_s, positions * frame_s)
        # the largest batch of this type in any stage (a stage may set its own, e.g. the demo's text-LM stage)
        batch = max([src.batch_size] + [stage.batch_sizes[dtype] for stage in plan.stages])
        out.append(_within_budget(BatchShape(dtype, batch, positions, round(audio_s, 3)), src, model,
                                  cfg.sampling_rate))
    return out


def _within_budget(shape: BatchShape, src, model, sampling_rate: int) -> BatchShape:
    """`shape` bounded by the type's batch budgets. A sample over a budget is skipped by the stream, so the longest
    is at most the budget. The LM sees at most `max_batch_tokens` / longest samples of the longest; the encoder at
    most as many clips of the longest audio as each budget allows (the token budget counts audio positions too).
    Each is an upper bound, so the smallest is one; `positions` is not lowered with the audio (conservative)."""
    n_lm, positions, audio_s = shape.batch_size, shape.positions, shape.audio_s
    if src.max_batch_audio_s is None and src.max_batch_tokens is None:
        return shape
    bounds = [n_lm]
    if src.max_batch_audio_s is not None and audio_s > 0:
        audio_s = min(audio_s, src.max_batch_audio_s)
        bounds.append(src.max_batch_audio_s / audio_s)
    if src.max_batch_tokens is not None:
        positions = min(positions, src.max_batch_tokens)
        n_lm = min(n_lm, src.max_batch_tokens / positions)
        if audio_s > 0:
            bounds.append(src.max_batch_tokens / max(1, model.audio_token_count(int(audio_s * sampling_rate))))
    return dataclasses.replace(shape, batch_size=n_lm, positions=positions, audio_s=round(audio_s, 3),
                               audio_batch=min(bounds) if audio_s > 0 else None)


def run_memory_plan(plan) -> tuple[Plan, str]:
    """The run's plan per worker and its table (`jobs.train --check`): the most memory-hungry stage's. `plan`: a
    `jobs.training.plan.RunPlan` (its manifests read, where the corpora's longest samples are looked up)."""
    from models.skeleton import shapes, skeleton

    tr = plan.train
    mode = run_mode(tr)
    # hybrid sharding: a worker holds 1/shard-size of the model, however many replicas there are
    sharded_over = tr.fsdp_shard_size or tr.num_workers
    vocab = plan.recipe.model.tokenizer_vocab_size if plan.offline_tokenizer else None
    plans = []
    for cfg, _ in plan.distinct_models():
        model = skeleton(cfg, vocab_size=vocab)
        plans.append(plan_memory(shapes(model), largest_batches(plan, model), mode, strategy=tr.strategy,
                                 world=sharded_over, gpu=tr.use_gpu,
                                 pretrained=bool(cfg.lm.pretrained or cfg.encoder.pretrained),
                                 lm_pretrained=bool(cfg.lm.pretrained)))
    worst = max(plans, key=lambda p: p.peak(tr.activation_checkpointing))
    strategy = f"hsdp (shards of {sharded_over})" if tr.fsdp_shard_size else tr.strategy
    return worst, describe_plan(worst, mode, strategy, tr.num_workers, tr.activation_checkpointing)
