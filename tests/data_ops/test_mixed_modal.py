"""Mixed-modal generation: a span of consecutive sentences is spoken and replaced by its audio, at the start,
middle, end or as the whole turn; the audio is checked against the words it replaced, not trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_ops.mixed_modal import choose_span, make_mixed_modal, mixed_modal_dataset, mixed_modal_row_to_cut, split_sentences
from data_ops.schema import SchemaError, cut_to_conversation
from data_ops.tts import EspeakTTS
from models.conversation import AudioPart, Conversation, TextPart, Turn

PROMPT = ("I have three red apples. My friend gives me four green apples tomorrow morning. "
          "Then I eat one of them. How many apples do I have now?")


def _conv(text=PROMPT):
    return Conversation([Turn.text("system", "Be brief."), Turn.text("user", text), Turn.text("assistant", "Six.")])


def test_split_sentences():
    assert split_sentences(PROMPT) == ["I have three red apples.", "My friend gives me four green apples tomorrow morning.",
                                       "Then I eat one of them.", "How many apples do I have now?"]
    assert split_sentences("One line\nSecond line!  Third?") == ["One line", "Second line!", "Third?"]


def test_choose_span_covers_each_position_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        i, j, pos = choose_span(4, rng)
        assert 0 <= i < j <= 4
        assert pos == ("whole" if (i, j) == (0, 4) else "start" if i == 0 else "end" if j == 4 else "middle")
        seen.add(pos)
    assert seen == {"start", "middle", "end", "whole"}
    assert choose_span(1, rng)[2] == "whole"
    with pytest.raises(SchemaError, match="cannot have speech at position 'middle'"):
        choose_span(2, rng, "middle")


@pytest.mark.parametrize("position", ["start", "middle", "end", "whole"])
def test_spoken_span_replaces_exactly_those_words(position):
    tts = EspeakTTS()
    conv, meta = make_mixed_modal(_conv(), tts, np.random.default_rng(5), position=position)
    assert meta["position"] == position
    user = conv.turns[1]
    kinds = [type(p).__name__ for p in user.parts]
    assert kinds == {"start": ["AudioPart", "TextPart"], "middle": ["TextPart", "AudioPart", "TextPart"],
                     "end": ["TextPart", "AudioPart"], "whole": ["AudioPart"]}[position]
    (audio_part,) = user.audio_parts
    # nothing lost, nothing duplicated: the text parts and the spoken text rejoin to the original turn
    rejoined = " ".join(p.text if isinstance(p, TextPart) else p.transcript for p in user.parts)
    assert rejoined == PROMPT
    assert conv.turns[0].text_only == "Be brief." and conv.turns[2].text_only == "Six."

    # The audio says the replaced words: (1) its length fits the word count at the drawn speaking rate, and
    # (2) re-speaking the same words with the same voice/rate/pitch gives the same audio, while re-speaking
    # the rest of the turn does not.
    words = len(meta["spoken"].split())
    seconds = audio_part.duration
    expected = words / (meta["rate"] / 60.0)
    assert 0.5 * expected < seconds < 2.0 * expected + 0.6, (seconds, expected)
    again, _ = _speak(tts, meta["spoken"], meta)
    np.testing.assert_allclose(again, audio_part.audio, atol=1e-6)
    others = [s for s in split_sentences(PROMPT) if s not in meta["spoken"]]
    if others:
        other, _ = _speak(tts, " ".join(others), meta)
        assert abs(len(other) - audio_part.num_samples) > 1600  # differs by more than 0.1 s


def _speak(tts, text, meta):
    class Fixed:  # an rng that gives back the recorded rate and pitch
        def integers(self, lo, hi):
            return meta["rate"] if lo == tts.rate[0] else meta["pitch"]

    return tts.synthesize(text, "en", Fixed(), voice=meta["voice"])


def test_rejects_multi_turn_and_audio_turns(pcm_audio):
    tts = EspeakTTS()
    multi = Conversation([Turn.text("user", "a."), Turn.text("assistant", "b"), Turn.text("user", "c."),
                          Turn.text("assistant", "d")])
    with pytest.raises(SchemaError, match="single-turn"):
        make_mixed_modal(multi, tts, np.random.default_rng(0))
    with pytest.raises(SchemaError, match="already has audio"):
        make_mixed_modal(Conversation([Turn("user", [AudioPart(pcm_audio(0.1))]), Turn.text("assistant", "x")]),
                         tts, np.random.default_rng(0))


def test_ray_data_job_is_deterministic_and_reports_bad_rows(ray_local):
    rows = [{"id": f"p{i}", "lang": "en", "conversation": json.dumps(_conv().to_dict())} for i in range(5)]
    rows.append({"id": "bad", "lang": "en", "conversation": json.dumps(
        Conversation([Turn.text("user", "a."), Turn.text("assistant", "b"), Turn.text("user", "c."),
                      Turn.text("assistant", "d")]).to_dict())})
    first = {r["id"]: r for r in mixed_modal_dataset(rows, seed=3, concurrency=2).iter_rows()}
    second = {r["id"]: r for r in mixed_modal_dataset(rows, seed=3, concurrency=1).iter_rows()}
    assert set(first) == {r["id"] for r in rows}
    assert "single-turn" in first["bad"]["error"]
    for rid in ("p0", "p1", "p2", "p3", "p4"):
        assert first[rid]["error"] is None
        assert first[rid]["audio"] == second[rid]["audio"], "same seed -> same audio however the work is split"
        cut = mixed_modal_row_to_cut(first[rid])
        assert cut.custom["data_type"] == "mixed_modal" and cut.custom["tts"]["engine"] == "espeak-ng"
        conv = cut_to_conversation(cut)
        assert len(conv.audio_parts) == 1 and conv.audio_parts[0].num_samples > 8000
    assert len({json.loads(first[r]["meta"])["voice"] + str(json.loads(first[r]["meta"])["span"])
                for r in ("p0", "p1", "p2", "p3", "p4")}) > 1, "voices/spans vary per sample"


def test_spoken_tasks_are_one_sentence_turns_of_every_other_kind_so_the_whole_turn_is_spoken():
    """The demo's mixed-modal source beyond word problems: single-turn tasks whose user turn is one sentence, so
    the paper's random span of sentences can only be the whole turn (pure speech)."""
    from data_ops.demo_corpus import spoken_task

    rng = np.random.default_rng(0)
    tasks = [spoken_task(rng) for _ in range(200)]
    assert all([role for role, _ in t] == ["user", "assistant"] for t in tasks)
    assert all(len(split_sentences(t[0][1])) == 1 for t in tasks), [t[0][1] for t in tasks]
    assert all(choose_span(1, rng) == (0, 1, "whole") for _ in range(5))
    starts = {t[0][1].split()[0] for t in tasks}  # arithmetic, counting, spelling/reversing/letters, list tasks
    assert {"What", "Count", "Spell", "Reverse", "How", "Sort"} <= starts, starts
