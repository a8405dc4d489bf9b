"""Audio placement, loss labels and the chat template, on the tiny tokenizer and model."""

from __future__ import annotations

import torch

from models.conversation import AudioPart, Conversation, TextPart, Turn
from models.processor import IGNORE_INDEX


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """(start, end) of each run of True."""
    runs, start = [], None
    for i, m in enumerate(mask + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _multi_audio_conversation(audio):
    a1, a2, a3 = audio(1.0, 1), audio(2.3, 2), audio(0.7, 3)
    conv = Conversation([
        Turn.text("system", "You are a helpful assistant."),
        Turn("user", [TextPart("first"), AudioPart(a1), TextPart("middle"), AudioPart(a2), TextPart("last")]),
        Turn.text("assistant", "answer one"),
        Turn("user", [AudioPart(a3)]),
        Turn.text("assistant", "answer two"),
    ])
    return conv, [a1, a2, a3]


def test_audio_positions_match_each_segment_in_order(make_model, audio):
    model = make_model()
    conv, audios = _multi_audio_conversation(audio)
    enc = model.processor.encode(conv)
    runs = _runs(enc.audio_mask)
    # One run per audio part, in order, each exactly as long as the frames the model makes for it.
    assert [e - s for s, e in runs] == [model.audio_token_count(len(a)) for a in audios]
    tok = model.tokenizer
    text_between = [tok.decode(enc.input_ids[e1:s2]) for (_, e1), (s2, _) in zip(runs, runs[1:])]
    assert text_between[0] == " middle "
    assert "answer one" in text_between[1] and text_between[1].endswith("<start_of_turn>user\n")
    assert tok.decode(enc.input_ids[: runs[0][0]]).endswith("You are a helpful assistant.\n\nfirst ")
    assert tok.decode(enc.input_ids[runs[1][1] : runs[1][1] + 2]).startswith(" last")


def test_embeddings_land_exactly_where_the_placeholders_were(make_model, audio):
    model = make_model().eval()
    conv, audios = _multi_audio_conversation(audio)
    conv2 = Conversation([Turn("user", [AudioPart(audio(1.6, 9)), TextPart("what was said?")]),
                          Turn.text("assistant", "nothing")])
    batch = model.processor([conv, conv2])
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["audio_mask"], batch["audio"], batch["audio_lens"])
        text_embeds = model.lm.get_input_embeddings()(batch["input_ids"])
        audio_embeds, lens = model.encode_audio(batch["audio"], batch["audio_lens"])
    mask = batch["audio_mask"]
    # Text positions keep their token embeddings untouched.
    torch.testing.assert_close(embeds[~mask], text_embeds[~mask], rtol=0, atol=0)
    # Audio position k of conversation b holds frame j of audio i, in order, across both conversations.
    expected = torch.cat([audio_embeds[i, : int(n)] for i, n in enumerate(lens)])
    torch.testing.assert_close(embeds[mask], expected, rtol=0, atol=0)
    # And the frames of each audio do not depend on what else is in the batch (padding is masked).
    with torch.no_grad():
        alone, alone_lens = model.encode_audio(torch.from_numpy(audios[1])[None], torch.tensor([len(audios[1])]))
    torch.testing.assert_close(alone[0, : int(alone_lens[0])], audio_embeds[1, : int(lens[1])], rtol=1e-4, atol=1e-4)


def test_labels_cover_only_assistant_turns(make_model, audio):
    model = make_model()
    conv, _ = _multi_audio_conversation(audio)
    enc = model.processor.encode(conv)
    labeled = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX]
    runs = _runs([label != IGNORE_INDEX for label in enc.labels])
    texts = [model.tokenizer.decode(enc.input_ids[s:e]) for s, e in runs]
    assert texts == ["answer one<end_of_turn>\n", "answer two<end_of_turn>\n"]
    assert all(enc.labels[i] == enc.input_ids[i] for i in labeled)
    assert not any(enc.audio_mask[i] for i in labeled)


def test_generation_prompt_has_no_labels_and_ends_with_model_turn(make_model, audio):
    model = make_model()
    conv = Conversation([Turn("user", [TextPart("hi"), AudioPart(audio(0.5))])])
    enc = model.processor.encode(conv, for_generation=True)
    assert enc.num_label_tokens == 0
    assert model.tokenizer.decode(enc.input_ids).endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_collate_pads_left_for_generation_and_right_for_training(make_model, audio):
    model = make_model()
    short = Conversation([Turn.text("user", "hi")])
    long = Conversation([Turn("user", [TextPart("a much longer question"), AudioPart(audio(1.0))])])
    left = model.processor([short, long], for_generation=True)
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    right = model.processor([Conversation(short.turns + [Turn.text("assistant", "x")]),
                             Conversation(long.turns + [Turn.text("assistant", "y")])])
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0
    assert right["audio"].shape == (1, 16000) and right["audio_lens"].tolist() == [16000]
