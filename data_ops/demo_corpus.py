"""A demo corpus that needs nothing from outside: all four data types, generated and spoken here.

- text SFT: arithmetic, counting, word and list tasks, some as multi-turn dialogues, and multi-sentence word
  problems (single-turn; the source of the mixed-modal type);
- ASR/AST: parallel sentences in En/De/Es/Fr (numbers, days, colours, times, names; one or two sentences per
  utterance) spoken by espeak-ng with a voice of that language; every utterance gives an ASR conversation and
  every other one an AST conversation (X->En for De/Es/Fr speech, En->X for English speech); sizes with
  `instruction_speech` add English ASR utterances of text-task user turns (`instruction_sentence`), so the speech
  is not only the five sentence templates;
- speech QA: English utterances with a question and answer derived from the sentence templates (what an LLM
  would be asked for, `data_ops.sqa`, known exactly here);
- mixed-modal: word problems with a span of their sentences spoken, and (sizes with `spoken_tasks`) single-turn
  tasks of the other kinds whose one-sentence user turn is spoken whole (`data_ops.mixed_modal`, a Ray Data job).

Everything is drawn from one seed; `SIZES` go from `tiny` (tests, seconds) to `demo` (a few thousand utterances).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import numpy as np
from tqdm import tqdm

from data_ops.importers import LANGUAGE_NAMES, speech_cuts
from data_ops.mixed_modal import mixed_modal_dataset, mixed_modal_row_to_cut
from data_ops.schema import conversation_to_cut
from data_ops.shards import CorpusManifest, ShardWriter
from data_ops.sqa import sqa_conversation
from data_ops.tts import HELD_OUT_VOICES, TRAIN_VOICES, EspeakTTS, SpeakMapper
from models.conversation import Conversation, Turn

logger = logging.getLogger("vtblender.data")

LANGS = ("en", "de", "es", "fr")


@dataclasses.dataclass(frozen=True)
class CorpusSize:
    text: int  # text SFT conversations (plus as many word problems as `mixed`)
    speech: int  # spoken utterances; each gives an ASR cut, every other one an AST cut too
    sqa: int  # of the English utterances, how many also get a speech-QA cut (at most all of them)
    mixed: int  # mixed-modal conversations
    sentences: int = 0  # text tasks on the spoken sentences (`sentence_task`), added to the text SFT
    spoken_tasks: int = 0  # mixed-modal conversations from the other single-turn tasks (`spoken_task`), spoken whole
    instruction_speech: int = 0  # English ASR utterances of text-task user turns (`instruction_sentence`)


SIZES = {
    "tiny": CorpusSize(text=24, speech=16, sqa=6, mixed=6),
    "small": CorpusSize(text=300, speech=240, sqa=60, mixed=80),
    # `make demo` (jobs/recipes/demo.yaml): sentence tasks, so that the text LM has written every word it will hear
    "demo": CorpusSize(text=1000, speech=800, sqa=100, mixed=150, sentences=1500),
    # the demo's held-out corpus (other voices): utterances to transcribe, the promotion gate's samples
    "demo-eval": CorpusSize(text=64, speech=32, sqa=4, mixed=8),
    # the ablation miniature (jobs/ablation.py): enough text for its LM to learn the tasks (~80% exact match)
    # and sentence tasks, so that its LM knows the languages it will hear, as the paper's Gemma does
    "ablation": CorpusSize(text=8000, speech=1600, sqa=400, mixed=400, sentences=2000),
    # the miniature's current corpus (docs/ablation.md): mixed-modal data from every kind of single-turn task too,
    # as the paper speaks Alpaca's and Magpie's instructions of every kind
    "ablation-spoken-tasks": CorpusSize(text=8000, speech=1600, sqa=400, mixed=400, sentences=2000, spoken_tasks=800),
    # the same with open-vocabulary ASR: the five templates alone train a recognizer of those five sentences,
    # which hears any spoken instruction as one of them; utterances of the text tasks' own sentences widen it
    "ablation-open-asr": CorpusSize(text=8000, speech=1600, sqa=400, mixed=400, sentences=2000, spoken_tasks=800,
                                    instruction_speech=1600),
    "ablation-eval": CorpusSize(text=200, speech=160, sqa=40, mixed=100, sentences=50),
    "ablation-quick": CorpusSize(text=1200, speech=120, sqa=20, mixed=20),  # CI's shortened ablation
    # its suite scores ASR and text only: no mixed-modal or spoken-instruction sets (drawn after the rest, so the
    # text and speech sets are the same as with them)
    "ablation-quick-eval": CorpusSize(text=80, speech=24, sqa=4, mixed=0),
}

_DAYS = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
}
_COLORS = {
    "en": ["red", "blue", "green", "yellow", "black", "white"],
    "de": ["rot", "blau", "grün", "gelb", "schwarz", "weiß"],
    "es": ["rojo", "azul", "verde", "amarillo", "negro", "blanco"],
    "fr": ["rouge", "bleu", "vert", "jaune", "noir", "blanc"],
}
_NAMES = ["Anna", "Paul", "Maria", "Lukas", "Sofia", "Hugo", "Emma", "Leo"]

# Parallel sentence templates: per language, and the English question/answer a listener could be asked.
_TEMPLATES = [
    ({"en": "The number is {n}.", "de": "Die Zahl ist {n}.", "es": "El número es {n}.", "fr": "Le nombre est {n}."},
     ("What number is mentioned?", "The number is {n}.")),
    ({"en": "Today is {day}.", "de": "Heute ist {day}.", "es": "Hoy es {day}.", "fr": "Aujourd'hui, c'est {day}."},
     ("What day is it today?", "Today is {day_en}.")),
    ({"en": "My favorite color is {color}.", "de": "Meine Lieblingsfarbe ist {color}.",
      "es": "Mi color favorito es el {color}.", "fr": "Ma couleur préférée est le {color}."},
     ("What is the speaker's favorite color?", "The favorite color is {color_en}.")),
    ({"en": "The train leaves at {h} o'clock.", "de": "Der Zug fährt um {h} Uhr ab.", "es": "El tren sale a las {h}.",
      "fr": "Le train part à {h} heures."},
     ("When does the train leave?", "The train leaves at {h} o'clock.")),
    ({"en": "My name is {name}.", "de": "Ich heiße {name}.", "es": "Me llamo {name}.", "fr": "Je m'appelle {name}."},
     ("What is the speaker's name?", "The speaker's name is {name}.")),
]
_WORDS = ["cat", "house", "river", "apple", "garden", "window", "music", "pencil", "orange", "planet", "bridge",
          "candle"]


def parallel_sentence(rng: np.random.Generator) -> tuple[dict[str, str], tuple[str, str]]:
    """One template filled in every language, and its English QA pair."""
    texts, (q, a) = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    day, color = int(rng.integers(7)), int(rng.integers(6))
    slots = {"n": int(rng.integers(0, 100)), "h": int(rng.integers(1, 13)), "name": str(rng.choice(_NAMES))}
    out = {lang: t.format(day=_DAYS[lang][day], color=_COLORS[lang][color], **slots) for lang, t in texts.items()}
    qa = (q, a.format(day_en=_DAYS["en"][day], color_en=_COLORS["en"][color], **slots))
    return out, qa


def utterance(rng: np.random.Generator) -> tuple[dict[str, str], tuple[str, str]]:
    """One or two parallel sentences; the QA pair is about the first."""
    first, qa = parallel_sentence(rng)
    if rng.random() < 0.4:
        second, _ = parallel_sentence(rng)
        first = {lang: f"{first[lang]} {second[lang]}" for lang in first}
    return first, qa


# ---- text SFT ------------------------------------------------------------------------------------------------

def _arithmetic(rng):
    op = str(rng.choice(["plus", "minus", "times"]))
    hi = 10 if op == "times" else 21  # sized for a small LM to learn (times tables, sums to 40)
    a, b = int(rng.integers(0, hi)), int(rng.integers(0, hi))
    c = a + b if op == "plus" else a - b if op == "minus" else a * b
    turns = [("user", f"What is {a} {op} {b}?"), ("assistant", f"{a} {op} {b} is {c}.")]
    if rng.random() < 0.4:  # a follow-up turn that needs the previous answer
        d = int(rng.integers(1, 10))
        turns += [("user", f"Now add {d} to that."), ("assistant", f"{c} plus {d} is {c + d}.")]
    return turns


def _counting(rng):
    a = int(rng.integers(0, 20))
    b = a + int(rng.integers(2, 7))
    return [("user", f"Count from {a} to {b}."), ("assistant", ", ".join(str(i) for i in range(a, b + 1)) + ".")]


def _word(rng):
    w = str(rng.choice(_WORDS))
    kind = int(rng.integers(3))
    if kind == 0:
        return [("user", f"Spell the word {w}."), ("assistant", f"{w} is spelled " + "-".join(w) + ".")]
    if kind == 1:
        return [("user", f"Reverse the word {w}."), ("assistant", f"{w} reversed is {w[::-1]}.")]
    return [("user", f"How many letters are in the word {w}?"), ("assistant", f"The word {w} has {len(w)} letters.")]


def _lists(rng):
    xs = [int(x) for x in rng.choice(50, size=int(rng.integers(3, 6)), replace=False)]
    shown = ", ".join(map(str, xs))
    if rng.random() < 0.5:
        turns = [("user", f"Sort these numbers from smallest to largest: {shown}."),
                 ("assistant", ", ".join(map(str, sorted(xs))) + ".")]
    else:
        turns = [("user", f"What is the largest number in this list: {shown}?"),
                 ("assistant", f"The largest number is {max(xs)}.")]
    if rng.random() < 0.3:
        turns += [("user", "And the smallest?"), ("assistant", f"The smallest number is {min(xs)}.")]
    return turns


def word_problem(rng) -> list[tuple[str, str]]:
    """A single-turn task whose user turn has several sentences (the mixed-modal source)."""
    a, b = int(rng.integers(2, 20)), int(rng.integers(2, 20))
    kind = int(rng.integers(4))
    if kind == 0:
        return [("user", f"I have {a} apples. My friend gives me {b} more. How many apples do I have now?"),
                ("assistant", f"You have {a + b} apples now.")]
    if kind == 1:
        return [("user", f"Tom is {a} years old. His sister is {b} years older. How old is his sister?"),
                ("assistant", f"His sister is {a + b} years old.")]
    if kind == 2:
        w = str(rng.choice(_WORDS))
        return [("user", f"Here is a word. The word is {w}. Please spell it."),
                ("assistant", f"{w} is spelled " + "-".join(w) + ".")]
    return [("user", f"Think of the number {a}. Double it. Then add {b}. What do you get?"),
            ("assistant", f"Doubling {a} gives {2 * a}, and adding {b} gives {2 * a + b}.")]


# every kind of text task, in the order `text_sft` cycles through them
_TASK_MAKERS = [_arithmetic, _counting, _word, _lists, word_problem]


def spoken_task(rng) -> list[tuple[str, str]]:
    """A single-turn task of the kinds other than word problems (arithmetic, counting, word, list tasks): the
    mixed-modal source whose user turn is one sentence, so the paper's random span of sentences is the whole turn.

    Why: the paper speaks sentences of Alpaca's and Magpie's turns, every kind of instruction; word problems alone
    would teach the model to hear only the words of word problems (its encoder never hears "times" or "spell")."""
    makers = _TASK_MAKERS[:-1]  # all but word problems
    return makers[int(rng.integers(len(makers)))](rng)[:2]


def instruction_sentence(rng) -> str:
    """The user turn of a single-turn text task of any kind (English, one to four sentences): ASR speech beyond the
    five templates, as a real ASR corpus says far more than the sentences a model is later asked about."""
    return _TASK_MAKERS[int(rng.integers(len(_TASK_MAKERS)))](rng)[0][1]


def sentence_task(rng) -> list[tuple[str, str]]:
    """A text task on the spoken sentences' language: repeat a sentence, or translate it to or from English.

    Why: the paper's LM (Gemma after text SFT) already reads and translates the languages its speech data holds;
    SFT teaches it to listen, not to speak German. The demo's other text tasks are English arithmetic and spelling,
    so an LM trained on them alone has never produced a German or Spanish word or a name, and speech SFT would
    have to teach it the languages as well as the listening."""
    texts, _ = parallel_sentence(rng)
    lang = LANGS[int(rng.integers(len(LANGS)))]
    if rng.random() < 0.4:
        return [("user", f"Repeat this sentence: {texts[lang]}"), ("assistant", texts[lang])]
    if lang == "en":
        target = LANGS[int(rng.integers(1, len(LANGS)))]
        source = "en"
    else:
        source, target = lang, "en"
    return [("user", f"Translate from {LANGUAGE_NAMES[source]} to {LANGUAGE_NAMES[target]}: {texts[source]}"),
            ("assistant", texts[target])]


def text_sft(rng: np.random.Generator, n: int) -> list[list[tuple[str, str]]]:
    return [_TASK_MAKERS[i % len(_TASK_MAKERS)](rng) for i in range(n)]


def _spread(items: list, extra: list) -> list:
    """`items` in order with `extra` spread evenly among them."""
    if not extra:
        return items
    every = (len(items) + len(extra)) / len(extra)
    out, e = [], 0
    for item in items:
        out.append(item)
        while e < len(extra) and (len(out) + 1) >= every * (e + 1):
            out.append(extra[e])
            e += 1
    return out + extra[e:]


def _conversation(turns: list[tuple[str, str]]) -> Conversation:
    return Conversation([Turn.text(role, text) for role, text in turns])  # type: ignore[arg-type]


# ---- the corpus ----------------------------------------------------------------------------------------------

def build_demo_corpus(out_uri: str, size: str | CorpusSize = "tiny", *, seed: int = 0, shard_size: int = 200,
                      concurrency: int = 2, endpoint_url: str | None = None, tts_factory=None,
                      split: str = "train", progress: bool = True) -> CorpusManifest:
    """Generate all four types and write them as shards (with manifest) to `out_uri`. Needs a Ray cluster
    (`ray.init()` done by the caller, or a local one is started) for the TTS jobs.

    `split="eval"`: voices held out of training (`HELD_OUT_VOICES`; use another `seed` for other utterances), and
    a fifth set: the single-turn text tasks fully spoken (`mixed_modal` type, task `spoken_instruction`), which no
    recipe trains on directly (a corpus with `spoken_tasks` speaks tasks of the same kinds, in training voices)."""
    import ray.data

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if tts_factory is None:
        tts_factory = functools.partial(EspeakTTS, voices=dict(TRAIN_VOICES if split == "train" else HELD_OUT_VOICES))
    sz = SIZES[size] if isinstance(size, str) else size
    rng = np.random.default_rng(seed)
    with ShardWriter(out_uri, shard_size=shard_size, endpoint_url=endpoint_url, progress=progress) as writer:
        # text SFT
        text_cuts = [conversation_to_cut(_conversation(t), cut_id=f"text-{i:06d}", data_type="text", task="text",
                                         langs=["en"]) for i, t in enumerate(text_sft(rng, sz.text))]
        # drawn from their own generator (every other draw of the corpus stays as it was without them), and
        # spread evenly through the shards, so every stretch of training sees both kinds
        sentence_rng = np.random.default_rng([seed, 1])
        sentence_cuts = [conversation_to_cut(_conversation(sentence_task(sentence_rng)), cut_id=f"sentence-{i:06d}",
                                             data_type="text", task="text", langs=["en"]) for i in range(sz.sentences)]
        writer.write("text", _spread(text_cuts, sentence_cuts))

        # ASR / AST / SQA from spoken parallel sentences
        items, qa = [], {}
        for i in range(sz.speech):
            texts, pair = utterance(rng)
            lang = LANGS[i % len(LANGS)]
            target = "en" if lang != "en" else str(rng.choice(LANGS[1:]))
            uid = f"utt-{i:06d}"
            items.append({"id": uid, "lang": lang, "text": texts[lang], "seed": int(rng.integers(2**31)),
                          "translation": texts[target] if i % 2 == 0 else None, "target_lang": target})
            qa[uid] = pair
        # English ASR of text-task user turns: their own generator (every other draw stays as it was without them),
        # spread through the template utterances; no translation, no speech QA
        instruction_rng = np.random.default_rng([seed, 3])
        instructions = [{"id": f"utt-instr-{i:06d}", "lang": "en", "text": instruction_sentence(instruction_rng),
                         "seed": int(instruction_rng.integers(2**31)), "translation": None, "target_lang": None}
                        for i in range(sz.instruction_speech)]
        items = _spread(items, instructions)
        spoken_items = ray.data.from_items(items)
        spoken_items.context.execution_options.preserve_order = True  # reproducible shard contents
        spoken = spoken_items.map_batches(
            SpeakMapper, fn_constructor_kwargs={"tts_factory": tts_factory}, batch_size=8,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_cpus=1)
        sqa: list = []

        def speech_stream():  # streamed into the writer; SQA cuts (a few) are collected on the side
            for row in tqdm(spoken.iter_rows(), total=len(items), desc="speak utterances", disable=not progress):
                if row["error"]:
                    logger.warning("utterance %s skipped: %s", row["id"], row["error"])
                    continue
                audio = np.frombuffer(row["audio"], dtype="<f4").copy()
                yield from speech_cuts(row["id"], audio, row["text"], row["lang"], row["translation"],
                                       row["target_lang"])
                if row["id"] in qa and row["lang"] == "en" and len(sqa) < sz.sqa:
                    q, a = qa[row["id"]]
                    sqa.append(conversation_to_cut(sqa_conversation(audio, row["text"], q, a),
                                                   cut_id=f"{row['id']}-sqa", data_type="sqa", task="sqa",
                                                   langs=["en"]))

        writer.write("asr_ast", speech_stream())
        writer.write("sqa", sorted(sqa, key=lambda c: c.id))

        if not sz.mixed + sz.spoken_tasks:  # no mixed-modal data (CI's evaluation corpus): no TTS jobs for it
            return writer.manifest

        # mixed-modal from word problems, and from the other single-turn tasks (their own generator, so the word
        # problems and spoken instructions stay what they were without them)
        problems = [{"id": f"mixed-{i:06d}", "lang": "en",
                     "conversation": json.dumps(_conversation(word_problem(rng)).to_dict())} for i in range(sz.mixed)]
        task_rng = np.random.default_rng([seed, 2])
        problems += [{"id": f"mixed-task-{i:06d}", "lang": "en",
                      "conversation": json.dumps(_conversation(spoken_task(task_rng)).to_dict())}
                     for i in range(sz.spoken_tasks)]
        mixed_rows = mixed_modal_dataset(problems, seed=seed, concurrency=concurrency, tts_factory=tts_factory)

        def mixed_stream():
            for row in tqdm(mixed_rows.iter_rows(), total=len(problems), desc="mixed-modal", disable=not progress):
                if row["error"]:
                    logger.warning("mixed-modal %s skipped: %s", row["id"], row["error"])
                    continue
                yield mixed_modal_row_to_cut(row)

        writer.write("mixed_modal", mixed_stream())

        if split == "eval":  # spoken instructions: single-turn text tasks, the whole user turn spoken
            tasks = [t[:2] for t in text_sft(rng, sz.mixed)]
            spoken_rows = mixed_modal_dataset(
                [{"id": f"spoken-{i:06d}", "lang": "en", "conversation": json.dumps(_conversation(t).to_dict())}
                 for i, t in enumerate(tasks)], seed=seed + 1, concurrency=concurrency, tts_factory=tts_factory,
                position="whole")

            def spoken_stream():
                for row in tqdm(spoken_rows.iter_rows(), total=len(tasks), desc="spoken instructions",
                                disable=not progress):
                    if not row["error"]:
                        yield mixed_modal_row_to_cut(row, task="spoken_instruction")

            writer.write("mixed_modal", spoken_stream())
    logger.debug("demo corpus at %s: %s", out_uri, writer.manifest.summary())
    return writer.manifest
