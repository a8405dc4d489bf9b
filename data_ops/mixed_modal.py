"""Mixed-modal SFT from single-turn text SFT (paper 3.2.3): a random span of consecutive sentences of the user turn
is spoken by a TTS engine and replaced by that audio, so speech lands at the start, middle or end of the turn, or
replaces it whole.

`make_mixed_modal` does one conversation; `mixed_modal_dataset` runs it as a Ray Data job (one TTS engine per
actor, bounded concurrency). Each sample draws its own generator from (seed, sample id), so the output does not
depend on how Ray splits the work, and a rerun gives the same voices and spans.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Callable, Literal

import numpy as np

from data_ops.schema import SAMPLING_RATE, SchemaError, conversation_to_cut, fill_conversation
from data_ops.tts import EspeakTTS, TTSEngine
from models.conversation import AudioPart, Conversation, TextPart, Turn

Position = Literal["start", "middle", "end", "whole"]
POSITIONS: tuple[str, ...] = ("start", "middle", "end", "whole")

# A sentence ends at . ! ? (or their full-width forms) followed by space, or at a line break. Abbreviations like
# "e.g. this" split wrongly; that moves a span boundary, never loses text (the pieces are rejoined exactly).
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]


def feasible_positions(n_sentences: int) -> list[str]:
    if n_sentences <= 0:
        return []
    if n_sentences == 1:
        return ["whole"]
    if n_sentences == 2:
        return ["start", "end", "whole"]
    return list(POSITIONS)


def choose_span(n: int, rng: np.random.Generator, position: str | None = None) -> tuple[int, int, str]:
    """A span [i, j) of consecutive sentences. The position is drawn uniformly among those an n-sentence turn
    allows (or forced), then the span uniformly among the spans with that position."""
    options = feasible_positions(n)
    if position is None:
        position = str(rng.choice(options))
    elif position not in options:
        raise SchemaError(f"a {n}-sentence turn cannot have speech at position {position!r}; possible: {options}")
    if position == "whole":
        return 0, n, position
    if position == "start":
        return 0, int(rng.integers(1, n)), position
    if position == "end":
        return int(rng.integers(1, n)), n, position
    i = int(rng.integers(1, n - 1))
    return i, int(rng.integers(i + 1, n)), position


def make_mixed_modal(conv: Conversation, tts: TTSEngine, rng: np.random.Generator, *, lang: str = "en",
                     position: str | None = None) -> tuple[Conversation, dict]:
    """Replace a span of the (single) user turn's sentences by its speech. Returns the new conversation and what
    was done: position, span, spoken text, and the TTS engine's choices (voice, rate, pitch)."""
    users = [t for t in conv.turns if t.role == "user"]
    if len(users) != 1 or any(t.role not in ("system", "user", "assistant") for t in conv.turns):
        raise SchemaError(
            f"mixed-modal generation needs a single-turn conversation; this one has {len(users)} user turns")
    user = users[0]
    if user.audio_parts:
        raise SchemaError("the user turn already has audio")
    sentences = split_sentences(user.text_only)
    if not sentences:
        raise SchemaError("the user turn has no text to speak")
    i, j, position = choose_span(len(sentences), rng, position)
    spoken = " ".join(sentences[i:j])
    audio, tts_meta = tts.synthesize(spoken, lang, rng)
    parts: list = []
    if i > 0:
        parts.append(TextPart(" ".join(sentences[:i])))
    parts.append(AudioPart(audio, SAMPLING_RATE, transcript=spoken))
    if j < len(sentences):
        parts.append(TextPart(" ".join(sentences[j:])))
    turns = [Turn("user", parts) if t is user else t for t in conv.turns]
    meta = {"position": position, "span": [i, j], "num_sentences": len(sentences), "spoken": spoken, **tts_meta}
    return Conversation(turns), meta


def sample_rng(seed: int, sample_id: str) -> np.random.Generator:
    """One generator per sample, from the job seed and the sample's id (not its position in any partition)."""
    return np.random.default_rng([seed, zlib.crc32(sample_id.encode("utf-8"))])


class MixedModalMapper:
    """Ray Data callable class: rows {id, conversation (JSON), lang} -> mixed-modal rows with audio bytes.

    Rows that cannot be converted come back with `error` set (and are counted by the caller), never raised.
    """

    def __init__(self, seed: int, tts_factory: Callable[[], TTSEngine] = EspeakTTS, position: str | None = None):
        self.seed = seed
        self.tts = tts_factory()
        self.position = position

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"id": [], "lang": [], "conversation": [], "audio": [], "meta": [], "error": []}
        for sample_id, conv_json, lang in zip(batch["id"], batch["conversation"], batch["lang"]):
            out["id"].append(sample_id)
            out["lang"].append(lang)
            try:
                conv = fill_conversation(sample_id, json.loads(conv_json), None)
                mixed, meta = make_mixed_modal(conv, self.tts, sample_rng(self.seed, sample_id), lang=lang,
                                               position=self.position)
                cut = conversation_to_cut(mixed, cut_id=sample_id, data_type="mixed_modal", task="mixed_modal",
                                          langs=[lang])
                out["conversation"].append(json.dumps(cut.custom["conversation"]))
                out["audio"].append(cut.load_audio()[0].astype("<f4").tobytes())
                out["meta"].append(json.dumps(meta))
                out["error"].append(None)
            except Exception as e:  # one bad sample (or a TTS failure) must not end the job
                out["conversation"].append(None)
                out["audio"].append(None)
                out["meta"].append(None)
                out["error"].append(f"{type(e).__name__}: {e}")
        return out


def mixed_modal_dataset(rows: list[dict], *, seed: int, concurrency: int = 2,
                        tts_factory: Callable[[], TTSEngine] = EspeakTTS, position: str | None = None):
    """Ray Data job over text SFT rows `{id, conversation (JSON), lang}`; see `MixedModalMapper`. `position`
    forces where the speech goes ("whole": the user turn fully spoken, for spoken-instruction evaluation)."""
    import ray.data

    ds = ray.data.from_items(rows)
    ds.context.execution_options.preserve_order = True  # same corpus order on every run: reproducible shards
    return ds.map_batches(MixedModalMapper,
                          fn_constructor_kwargs={"seed": seed, "tts_factory": tts_factory, "position": position},
                          batch_size=4, compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=1)


def mixed_modal_row_to_cut(row: dict, task: str = "mixed_modal"):
    """An output row of `mixed_modal_dataset` -> a cut of the conversation schema (mixed_modal type)."""
    audio = np.frombuffer(row["audio"], dtype="<f4")
    conv = fill_conversation(row["id"], json.loads(row["conversation"]), audio)
    return conversation_to_cut(conv, cut_id=row["id"], data_type="mixed_modal", task=task,
                               langs=[row["lang"]],
                               extra={"tts": json.loads(row["meta"])})
