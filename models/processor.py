"""Conversation -> tensors: chat template, audio positions, loss labels.

How a conversation becomes a token sequence:
1. Each turn's parts are joined with single spaces into one message; an audio part becomes the config's
   placeholder string (never tokenized, only a marker in the rendered text).
2. The tokenizer's own chat template renders the messages (Gemma's turn markers for the tiny tokenizer).
3. Assistant spans are found by rendering prefixes: the text of turns[:i] with the generation prompt is a prefix
   of the text of turns[:i+1]; what lies between is turn i's answer plus its end-of-turn marker (and, where a
   template closes a conversation with one more token, as Phi-3's adds EOS, that token when the answer is the
   last turn). Templates that break this prefix property are rejected with a clear error rather than mislabeled.
   The end-of-turn marker itself (the first token after an answer) is what generation stops on
   (`end_of_turn_ids`): each LM family's own, read from its template, not assumed.
4. The text is cut at span boundaries and placeholders; each piece is tokenized on its own (so training sees
   exactly the prompt tokenization that generation sees); each placeholder becomes `n` reserved positions,
   where `n` is the number of adapter frames the model will produce for that audio.

Labels are -100 everywhere except assistant spans. `audio_mask` marks reserved positions; the model writes the
audio embeddings there in order, so audio i always lands where part i was.

Legend: B conversations, L tokens, N audio segments in the batch, S samples.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from models.conversation import Conversation, ConversationError, TextPart, Turn, validate_conversation

IGNORE_INDEX = -100


@dataclasses.dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    audio_mask: list[bool]
    audios: list[np.ndarray]  # in the order their positions appear in input_ids

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ConversationProcessor:
    """Turns `Conversation`s into model inputs. Needs only the tokenizer and the audio-frame count function, so
    it runs in data-loading workers without the model."""

    def __init__(
        self,
        tokenizer,
        audio_token_count: Callable[[int], int],
        placeholder: str = "<|audio|>",
        sampling_rate: int = 16000,
        max_tokens: int | None = None,
    ):
        if tokenizer.chat_template is None:
            raise ConversationError("the tokenizer has no chat template; use an instruction-tuned LM's tokenizer")
        self.tokenizer = tokenizer
        self.audio_token_count = audio_token_count
        self.placeholder = placeholder
        self.sampling_rate = sampling_rate
        self.max_tokens = max_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._end_of_turn_ids: list[int] | None = None  # read from the template once (every generate() asks)

    # -- rendering ----------------------------------------------------------------------------------------------
    def _messages(self, conv: Conversation) -> list[dict[str, str]]:
        out = []
        for turn in conv.turns:
            pieces = [p.text if isinstance(p, TextPart) else self.placeholder for p in turn.parts]
            out.append({"role": turn.role, "content": " ".join(x.strip() for x in pieces if x.strip())})
        return out

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja's TemplateError, raise_exception() in templates
            raise ConversationError(f"the chat template rejected the conversation: {e}") from e

    def render(self, conv: Conversation, for_generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """The templated text and the character spans of assistant turns (which carry the loss)."""
        msgs = self._messages(conv)
        full = self._render(msgs, add_generation_prompt=for_generation)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], add_generation_prompt=True)
            with_answer = self._render(msgs[: i + 1], add_generation_prompt=False)
            # a template may end a conversation with more than it puts between turns (Phi-3: EOS): the span ends
            # where this turn's rendering and the whole conversation's part
            end = _common_prefix_len(with_answer, full)
            answer_end = with_answer.rfind(m["content"]) + len(m["content"]) if m["content"] else len(prompt)
            if not (with_answer.startswith(prompt) and full.startswith(prompt) and end >= answer_end):
                raise ConversationError(
                    "the tokenizer's chat template does not render conversations prefix-wise, so the answer "
                    "spans cannot be located; use a template where each turn only appends text"
                )
            spans.append((len(prompt), end))
        return full, spans

    def end_of_turn_ids(self) -> list[int]:
        """The special token the chat template closes an assistant turn with: Gemma's `<end_of_turn>`, Llama 3's
        `<|eot_id|>`, ChatML's `<|im_end|>`, Phi-3's `<|end|>`, Mistral's `</s>`. [] when the first thing after
        an answer is not a special token (the template has no marker; EOS alone ends generation)."""
        if self._end_of_turn_ids is None:
            self._end_of_turn_ids = self._read_end_of_turn_ids()
        return list(self._end_of_turn_ids)

    def stop_token_ids(self, end_of_turn: str | None = None) -> list[int]:
        """What generation stops on: EOS, the chat template's end-of-turn token (`end_of_turn_ids`), and the token
        `end_of_turn` names when a config names one explicitly."""
        ids = [self.tokenizer.eos_token_id, *self.end_of_turn_ids()]
        if end_of_turn:
            eot = self.tokenizer.convert_tokens_to_ids(end_of_turn)
            if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
                ids.append(eot)
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _read_end_of_turn_ids(self) -> list[int]:
        probe = "The answer is 42."
        msgs = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": probe}]
        done = self._render(msgs, add_generation_prompt=False)
        after = done[done.rfind(probe) + len(probe):].lstrip(" ")
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        return ids[:1] if ids and ids[0] in special else []

    # -- tokenization -------------------------------------------------------------------------------------------
    def encode(self, conv: Conversation, for_generation: bool = False) -> EncodedConversation:
        validate_conversation(
            conv, sampling_rate=self.sampling_rate, for_generation=for_generation, placeholder=self.placeholder
        )
        text, spans = self.render(conv, for_generation)
        audios = [np.asarray(a.audio, dtype=np.float32) for a in conv.audio_parts]
        # Cut points: span edges. Each piece is (text, is_answer).
        pieces, pos = [], 0
        for start, end in spans:
            pieces += [(text[pos:start], False), (text[start:end], True)]
            pos = end
        pieces.append((text[pos:], False))

        ids: list[int] = []
        labels: list[int] = []
        audio_mask: list[bool] = []
        audio_i = 0
        for piece, is_answer in pieces:
            chunks = piece.split(self.placeholder)
            for k, chunk in enumerate(chunks):
                if k > 0:  # a placeholder stood before this chunk
                    if audio_i >= len(audios):
                        raise ConversationError("the chat template duplicated an audio placeholder")
                    n = self.audio_token_count(len(audios[audio_i]))
                    ids += [self.pad_id] * n
                    labels += [IGNORE_INDEX] * n
                    audio_mask += [True] * n
                    audio_i += 1
                if chunk:
                    toks = self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
                    ids += toks
                    labels += toks if is_answer else [IGNORE_INDEX] * len(toks)
                    audio_mask += [False] * len(toks)
        if audio_i != len(audios):
            raise ConversationError(
                f"the chat template kept {audio_i} of {len(audios)} audio parts; it must keep message content whole"
            )
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise ConversationError(
                f"the conversation is {len(ids)} tokens (audio included), over the limit of {self.max_tokens}; "
                "it is not truncated: shorten it or raise max_tokens"
            )
        return EncodedConversation(ids, labels, audio_mask, audios)

    # -- batching -----------------------------------------------------------------------------------------------
    def collate(
        self, encoded: Sequence[EncodedConversation], padding_side: Literal["right", "left"] = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad to a batch.

        Returns input_ids, attention_mask, labels, audio_mask: (B, L); audio: (N, S) zero-padded float32;
        audio_lens: (N,). Right padding for training, left for generation.
        """
        if not encoded:
            raise ConversationError("cannot collate an empty batch")
        L = max(len(e) for e in encoded)
        B = len(encoded)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        audio_mask = torch.zeros((B, L), dtype=torch.bool)
        for b, e in enumerate(encoded):
            n = len(e)
            sl = slice(L - n, L) if padding_side == "left" else slice(0, n)
            input_ids[b, sl] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[b, sl] = torch.tensor(e.labels, dtype=torch.long)
            attention_mask[b, sl] = 1
            audio_mask[b, sl] = torch.tensor(e.audio_mask, dtype=torch.bool)
        all_audio = [a for e in encoded for a in e.audios]
        S = max((len(a) for a in all_audio), default=0)
        audio = torch.zeros((len(all_audio), S), dtype=torch.float32)
        for i, a in enumerate(all_audio):
            audio[i, : len(a)] = torch.from_numpy(a)
        audio_lens = torch.tensor([len(a) for a in all_audio], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "audio_mask": audio_mask,
            "audio": audio,
            "audio_lens": audio_lens,
        }

    def __call__(self, conversations: Sequence[Conversation], for_generation: bool = False) -> dict[str, torch.Tensor]:
        encoded = [self.encode(c, for_generation=for_generation) for c in conversations]
        return self.collate(encoded, padding_side="left" if for_generation else "right")


HOST_KEYS = frozenset({"audio_lens"})


def move_batch(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The batch on `device`, its audio lengths left on the host: the model derives every frame count from them
    in Python, which on a GPU would otherwise wait for the device (a host sync per clip)."""
    return {k: v if k in HOST_KEYS else v.to(device) for k, v in batch.items()}


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def text_conversation(*turns: tuple[str, str]) -> Conversation:
    """Convenience: `text_conversation(("user", "hi"), ("assistant", "hello"))`."""
    return Conversation([Turn.text(role, text) for role, text in turns])  # type: ignore[arg-type]


