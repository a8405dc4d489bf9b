"""Tiny offline stand-ins for the chat LMs users bring: each family's transformers architecture at toy size, with a
tokenizer made here (byte-level BPE, the `tokenizers` package) that carries that family's special tokens and a chat
template rendering conversations the way the family's instruct checkpoints do (turn markers, default system
prompts, date header, end-of-turn token, what closes a conversation). Saved to a folder, they load by the path
a hub id takes (`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from models.tokenizer import GEMMA_STYLE_CHAT_TEMPLATE

GEMMA = GEMMA_STYLE_CHAT_TEMPLATE  # the project's own tiny tokenizer's: Gemma's turn markers

# Llama 3.1/3.2 instruct: a system header always, with the knowledge-cutoff and date lines
LLAMA3 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{ 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' }}"
    "{{ system + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5 instruct: ChatML, with a default system prompt when the conversation has none
QWEN2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' or not loop.first %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3: ChatML without a default system prompt; with enable_thinking=false the generation prompt holds an empty
# reasoning block
QWEN3 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

# Phi-3 / 3.5: role tokens, <|end|> after each turn, and EOS after the last one when no generation prompt follows
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Mistral-7B-Instruct v0.3: [INST] ... [/INST] answer</s>; the system prompt goes into the last user turn
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.last and system_message is defined %}{{ '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    template: str
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    extra_special: tuple[str, ...]
    end_of_turn: str
    """The token the family's instruct models end a turn with (what generation must stop on)."""
    config: dict = dataclasses.field(default_factory=dict)


FAMILIES = {
    "gemma": Family("gemma", GEMMA, "<bos>", "<eos>", "<pad>", "<unk>", ("<start_of_turn>", "<end_of_turn>"),
                    "<end_of_turn>"),
    "gemma2": Family("gemma2", GEMMA, "<bos>", "<eos>", "<pad>", "<unk>", ("<start_of_turn>", "<end_of_turn>"),
                     "<end_of_turn>", {"query_pre_attn_scalar": 16, "sliding_window": 64}),
    "gemma3": Family("gemma3_text", GEMMA, "<bos>", "<eos>", "<pad>", "<unk>", ("<start_of_turn>", "<end_of_turn>"),
                     "<end_of_turn>", {"query_pre_attn_scalar": 16, "sliding_window": 64}),
    # Llama's tokenizer has no pad token; its base EOS is <|end_of_text|>, while instruct turns end on <|eot_id|>
    "llama": Family("llama", LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", None, None,
                    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    "qwen2": Family("qwen2", QWEN2, None, "<|im_end|>", "<|endoftext|>", None, ("<|im_start|>",), "<|im_end|>"),
    "qwen3": Family("qwen3", QWEN3, None, "<|im_end|>", "<|endoftext|>", None, ("<|im_start|>", "<think>", "</think>"),
                    "<|im_end|>"),
    # Phi-3's EOS is <|endoftext|>; a turn ends on <|end|>, which generation must stop on too
    "phi3": Family("phi3", PHI3, "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>",
                   ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    "mistral": Family("mistral", MISTRAL, "<s>", "</s>", None, "<unk>", ("[INST]", "[/INST]"), "</s>"),
}

_TEXT = """\
Transcribe the audio. Translate it to German. What is two plus three? The answer is five. Hello there.
You are a helpful assistant. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 system user assistant
"""


def build_tokenizer(family: Family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (family.pad, family.eos, family.bos, family.unk) if t] + list(family.extra_special)
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_TEXT], trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    named = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad, "unk_token": family.unk}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=list(family.extra_special),
                                   **{k: v for k, v in named.items() if v})
    fast.chat_template = family.template
    return fast


def save_family_checkpoint(name: str, root: Path, seed: int = 0) -> Path:
    """A tiny random `name` LM with its tokenizer, saved as a checkpoint folder (what a hub download gives)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    family = FAMILIES[name]
    tokenizer = build_tokenizer(family)
    ids = {k: tokenizer.convert_tokens_to_ids(t) if t else None
           for k, t in (("bos_token_id", family.bos), ("eos_token_id", family.eos), ("pad_token_id", family.pad))}
    config = AutoConfig.for_model(
        family.model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False, **ids, **family.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = root / name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
