"""The SpeechLM without its weights: the one home of every model built from configs alone.

- `config_only`: a config whose checkpoints are replaced by their configs (read, not their weights);
- `skeleton`: the model's structure with every parameter on the meta device, its computed buffers real (rotary
  frequencies, mel filterbanks) and its tied weights tied: what the training job's ranks start from
  (`jobs.training.model_init`), what `jobs.train --check` counts and what the memory plan measures;
- `shapes` / `layer_units`: what a plan asks of it: parameter counts per part, the widths of the LM, the encoder
  (whatever its kind: `ENCODER_WIDTHS`, the one place an encoder kind is described) and the adapter, and the
  layers FSDP shards one by one;
- `allocate`: a meta-device model (or its FSDP shards) given uninitialized memory, its computed buffers and tied
  weights kept (before rank 0's weights arrive);
- `unread_lm`: a pretrained LM whose weights are allocated but never read, for rank 0, which streams them from the
  checkpoint's files itself, so no worker holds a second, whole copy of the LM in host memory
  (`models.speechlm.build_speechlm(read_lm_weights=False)` builds its LM here)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from models.config import SpeechLMConfig


def allocate(core: nn.Module, device) -> None:
    """Give a meta-device model (or its meta shards) uninitialized memory on `device`, keeping the computed buffers'
    values and the tied weights (embeddings = LM head) tied: `to_empty` replaces every tensor, and a parameter two
    modules share becomes two."""
    buffers = {name: b for name, b in core.named_buffers()}
    first: dict[int, str] = {}
    ties = []  # (name, name of the parameter it is tied to)
    for name, p in core.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    core.to_empty(device=device)
    with torch.no_grad():
        for name, b in core.named_buffers():
            b.copy_(buffers[name])
    for name, target in ties:
        module, _, attr = name.rpartition(".")
        if core.get_parameter(name) is not core.get_parameter(target):
            setattr(core.get_submodule(module), attr, core.get_parameter(target))


def unread_lm(source: str) -> nn.Module:
    """A pretrained LM's structure with its weights allocated on the host but neither read nor initialized: the
    caller loads them (`jobs.training.model_init` streams them from the files). Pages a process allocates and never
    writes take no RAM, so the weights cost nothing until loaded.

    Built as transformers loads, parameters on the meta device (accelerate's `init_empty_weights`): no random
    numbers drawn, so the adapter and LoRA drawn after it get the values they get when the weights are read. Then
    allocated, not left on meta, because PEFT puts each LoRA weight on its base layer's device. The buffers
    (rotary frequencies) keep the values computed at build, and tied weights stay tied. In the checkpoint's dtype,
    as `from_pretrained` builds it (bf16 for Gemma's; PEFT rounds the LoRA init to it); `allocate_unwritten` then gives
    the weights the model's."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    allocate(lm, "cpu")
    lm.tie_weights()  # accelerate registers each name's meta parameter anew: the tied LM head came untied
    return lm


def allocate_unwritten(lm: nn.Module, dtype: torch.dtype) -> None:
    """The unread weights of `unread_lm` (all but LoRA's) allocated anew in `dtype`, still unwritten: cast to the
    model's dtype, every one would be written, and take memory, before it is loaded."""
    for name, p in lm.named_parameters():
        if "lora_" not in name and p.dtype != dtype:
            p.data = torch.empty(p.shape, dtype=dtype)


def config_only(cfg: SpeechLMConfig, vocab_size: int | None = None) -> SpeechLMConfig:
    """`cfg` with its checkpoints replaced by their configs (read, not their weights): what a meta-device build
    needs. `vocab_size`: the vocabulary of a random-init LM whose tokenizer is not built yet (the training job's
    offline tokenizer, built from the corpora at launch)."""
    from models.speechlm import strip_hf_config

    out = cfg.model_copy(deep=True)
    if cfg.lm.pretrained:
        lm = AutoConfig.from_pretrained(cfg.lm.pretrained).to_dict()
        out.lm.pretrained, out.lm.config = None, lm
    elif vocab_size is not None and not cfg.lm.tokenizer:
        out.lm.config.setdefault("vocab_size", vocab_size)
    if cfg.encoder.pretrained:
        enc = AutoConfig.from_pretrained(cfg.encoder.pretrained)
        out.encoder.pretrained = None
        out.encoder.config = strip_hf_config(getattr(enc, "encoder_config", enc).to_dict())
    return out


def skeleton(cfg: SpeechLMConfig, tokenizer=None, vocab_size: int | None = None) -> nn.Module:
    """The SpeechLM of `cfg` with every parameter on the meta device (no memory, nothing read) and its buffers
    computed on the host (they are not loaded, so a later `allocate` keeps them); the pretrained parts built from
    their configs. `tokenizer`: the LM's (None: `cfg`'s own, or none for a random-init LM of `vocab_size`).

    Built as transformers loads (accelerate's `init_empty_weights`), so the tied LM head is tied again after."""
    from accelerate import init_empty_weights

    from models.speechlm import build_speechlm

    with init_empty_weights(include_buffers=False):
        core = build_speechlm(config_only(cfg, vocab_size), device="meta", tokenizer=tokenizer)
    core.lm.tie_weights()  # accelerate registers each name's meta parameter anew: the tied LM head came untied
    return core


def lm_skeleton(cfg: SpeechLMConfig) -> nn.Module:
    """The LM alone, its parameters on the meta device, from its config (the checkpoint's or the inline one)."""
    from models.config import checkpoint_source

    if cfg.lm.pretrained:
        lm_config = AutoConfig.from_pretrained(checkpoint_source(cfg.lm.pretrained, "lm.pretrained"))
    else:
        kw = dict(cfg.lm.config)
        lm_config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(lm_config)


def layer_units(core: nn.Module) -> list[nn.Module]:
    """The model's layers (LM decoder layers, encoder blocks, adapter Conformer layers): what FSDP shards one by
    one and the memory plan counts the largest of."""
    from models.speechlm import ConformerLayer

    layer_classes = {name for m in core.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in core.modules() if type(m).__name__ in layer_classes or isinstance(m, ConformerLayer)]


def _dropout(c) -> float:
    return max(c.dropout, c.activation_dropout, c.attention_dropout)


# Each encoder kind's widths, read from its transformers config under the names the memory plan uses. A new encoder
# kind is described here (and given its layer's activation count in `jobs.training.memory_plan`).
ENCODER_WIDTHS = {
    "fastconformer": lambda c: dict(hidden=c.hidden_size, intermediate=c.intermediate_size,
                                    layers=c.num_hidden_layers, heads=c.num_attention_heads,
                                    channels=c.subsampling_conv_channels, subsampling=c.subsampling_factor,
                                    mels=c.num_mel_bins, dropout=_dropout(c)),
    "whisper": lambda c: dict(hidden=c.d_model, intermediate=c.encoder_ffn_dim, layers=c.encoder_layers,
                              heads=c.encoder_attention_heads, mels=c.num_mel_bins, dropout=_dropout(c)),
}


@dataclass
class ModelShapes:
    """What a plan needs of a built (meta) SpeechLM: parameter counts and the architecture's widths."""

    params: dict[str, int]  # encoder, adapter, lora, lm
    trainable: dict[str, int]
    lm_embedding: int  # the LM's input embedding (not autocast; tied to the head)
    lm: dict  # hidden, intermediate, layers, q_dim, kv_dim, vocab, lora_r, lora_in (widths into LoRA linears, a layer)
    encoder: dict  # kind + widths (`ENCODER_WIDTHS`)
    adapter: dict  # hidden, ff_mult, layers, in_dim, dropout
    frames: object = field(repr=False, default=None)  # samples -> (encoder frames, LM positions)
    largest_unit: int = 0  # parameters of the largest layer unit (`layer_units`)
    root_unit: int = 0  # parameters outside every layer unit (FSDP's root: embeddings, head, projections)

    @property
    def total(self) -> int:
        return sum(self.params.values())


def shapes(model) -> ModelShapes:
    """Shapes of a `models.speechlm.SpeechLM` (any device, `meta` included)."""
    params = model.parameter_counts()
    trainable = {"encoder": 0, "adapter": 0, "lora": 0, "lm": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = name.split(".", 1)[0]
            trainable["lora" if "lora_" in name else part] += p.numel()
    text = model.lm.config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layer0 = model.lm.get_decoder().layers[0]
    lora_in = [m.in_features for n, m in layer0.named_modules() if n.endswith("lora_A.default")
               and isinstance(m, nn.Linear)]
    lm = dict(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
              q_dim=heads * head_dim, kv_dim=text.num_key_value_heads * head_dim, vocab=text.vocab_size,
              lora_r=model.config.lm.lora.r if lora_in else 0, lora_in=lora_in)
    kind = model.encoder.kind
    if kind not in ENCODER_WIDTHS:
        raise ValueError(f"encoder kind {kind!r} has no widths in models.skeleton.ENCODER_WIDTHS")
    a = model.config.adapter
    units = layer_units(model)
    in_units = sum(p.numel() for u in units for p in u.parameters())
    return ModelShapes(
        params=params, trainable=trainable, lm_embedding=model.lm.get_input_embeddings().weight.numel(), lm=lm,
        encoder=dict(kind=kind, **ENCODER_WIDTHS[kind](model.encoder.encoder.config)),
        adapter=dict(hidden=a.hidden_size, ff_mult=a.ff_mult, layers=a.num_layers,
                     in_dim=model.encoder.hidden_size * a.stack_frames, stack=a.stack_frames,
                     dropout=a.dropout if a.train else 0.0),
        frames=lambda n: (model.encoder.output_length(n), model.audio_token_count(n)),
        largest_unit=max((sum(p.numel() for p in u.parameters()) for u in units), default=0),
        root_unit=sum(p.numel() for p in model.parameters()) - in_units)
