"""An offline tokenizer for tiny models: byte-level BPE with Gemma's chat template.

Real runs use the LM checkpoint's own tokenizer. Tests and the demo need one that exists without a hub: this
module trains a small byte-level BPE (every string encodes, no unknown tokens) with the `tokenizers` library on
texts the caller gives (the demo corpus) plus a fixed seed text, and wraps it in `PreTrainedTokenizerFast` so
the rest of the code sees the same API as for Gemma.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Gemma's turn markers (Appendix D of the paper). System text is folded into the first user turn, as Gemma 2/3
# templates do, since Gemma has no system role.
GEMMA_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% set content = (system + message['content']) if loop.first else message['content'] %}"
    "{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# Always part of the training text so common words and digits merge even when the caller gives little.
_SEED_TEXT = """\
Transcribe the content to English, with punctuations and capitalizations.
Translate the English content to German, with punctuations and capitalizations.
What is the answer? The answer is 42. Count the words in this sentence. Sort these numbers: 3, 1, 2.
user model system The a an and or of to in on for with is are was were be this that it you I we they
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus times equals yes no
Der die das und ist nicht ein eine El la los las y es no un una Le la les et est pas un une
"""


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` (+ a seed text) and return it with Gemma-style special tokens and template.

    Deterministic for the same inputs. `vocab_size` counts the 256 byte symbols and the special tokens.
    """
    tok = Tokenizer(models.BPE())
    # Digits one by one, as Gemma's tokenizer splits them: numbers compose from digits instead of being merged
    # into arbitrary multi-digit tokens, which is what lets a small LM learn arithmetic at all.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_SEED_TEXT, *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = GEMMA_STYLE_CHAT_TEMPLATE
    # Right padding for training; generation pads on the left itself.
    fast.padding_side = "right"
    return fast
