"""The data mixture: sampled proportions follow the ratios; streams resume exactly (no repeat, no skip)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_ops.mix_sampler import TypeStream, mix_sampler, padded_share
from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter
from models.conversation import AudioPart, Conversation, TextPart, Turn

PAPER = {"text": 0.15, "asr_ast": 0.7556, "sqa": 0.0378, "mixed_modal": 0.0566}


def test_sampled_proportions_match_ratios_chi_square():
    draw = mix_sampler(PAPER, seed=11)
    n = 20000
    counts = Counter(draw(step, 0) for step in range(n))
    expected = {k: v * n for k, v in PAPER.items()}
    chi2 = sum((counts[k] - e) ** 2 / e for k, e in expected.items())
    assert chi2 < 16.27, (counts, chi2)  # 3 degrees of freedom, p = 0.001
    # same on every rank (no communication): a fresh sampler with the same seed draws the same sequence
    again = mix_sampler(PAPER, seed=11)
    assert [again(s, 0) for s in range(500)] == [draw(s, 0) for s in range(500)]
    assert [mix_sampler(PAPER, seed=12)(s, 0) for s in range(500)] != [draw(s, 0) for s in range(500)]


def test_zero_ratio_types_are_never_drawn():
    draw = mix_sampler({"text": 0.0, "asr_ast": 1.0}, seed=0)
    assert {draw(s, m) for s in range(200) for m in range(2)} == {"asr_ast"}


def test_padded_share():
    assert padded_share([1.0, 1.0]) == 0.0
    assert padded_share([1.0, 3.0]) == pytest.approx(1 - 4 / 6)


@pytest.fixture
def corpus(tmp_path, pcm_audio):
    """29 utterances of varied length in 4 shards (8, 8, 8, 5)."""
    rng = np.random.default_rng(0)
    cuts = [conversation_to_cut(
        Conversation([Turn("user", [AudioPart(pcm_audio(float(rng.uniform(0.1, 0.6)), i)), TextPart("T.")]),
                      Turn.text("assistant", f"u{i}")]),
        cut_id=f"u{i:02d}", data_type="asr_ast", task="asr", langs=["en"]) for i in range(29)]
    with ShardWriter(str(tmp_path), shard_size=8, progress=False) as w:
        w.write("asr_ast", cuts)
    return str(tmp_path)


def _ids(stream, n):
    return [[r["id"] for r in stream.next_batch()] for _ in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 5])
def test_each_epoch_hands_out_every_row_once(corpus, world_size):
    first_epoch = Counter()
    for rank in range(world_size):
        fresh = TypeStream([corpus], "asr_ast", 3, seed=4, rank=rank, world_size=world_size, bucket_batches=2)
        while True:
            batch = fresh.next_batch()
            if fresh.epoch > 0:
                break
            first_epoch.update(r["id"] for r in batch)
    assert sorted(first_epoch) == [f"u{i:02d}" for i in range(29)] and set(first_epoch.values()) == {1}


def test_batches_are_grouped_by_duration(corpus):
    grouped = TypeStream([corpus], "asr_ast", 4, seed=1, bucket_batches=4)
    plain = TypeStream([corpus], "asr_ast", 4, seed=1, bucket_batches=1)
    pad_g = np.mean([padded_share([r["duration"] for r in grouped.next_batch()]) for _ in range(6)])
    pad_p = np.mean([padded_share([r["duration"] for r in plain.next_batch()]) for _ in range(6)])
    assert pad_g < 0.6 * pad_p, (pad_g, pad_p)


@pytest.mark.parametrize("stop_after", [1, 4, 9, 13])
def test_resume_continues_exactly(corpus, stop_after):
    """A stream restored from its state hands out exactly what the uninterrupted stream would have, across an
    epoch boundary too (29 rows / batch 3 -> epoch 1 starts at batch 10)."""
    reference = _ids(TypeStream([corpus], "asr_ast", 3, seed=9, rank=1, world_size=2, bucket_batches=3), 20)
    first = TypeStream([corpus], "asr_ast", 3, seed=9, rank=1, world_size=2, bucket_batches=3)
    head = _ids(first, stop_after)
    state = first.state_dict()
    _ids(first, 2)  # work done after the checkpoint is lost with the crash
    resumed = TypeStream([corpus], "asr_ast", 3, seed=9, rank=1, world_size=2, bucket_batches=3)
    resumed.load_state_dict(state)
    tail = _ids(resumed, 20 - stop_after)
    assert head + tail == reference


def test_ray_data_stream_equals_plain_stream(corpus, ray_local):
    """Through Ray Data (ordered, one read task per shard) the stream is the same as reading shards in-process,
    over several epochs: what makes a replay of the sample log possible."""
    from data_ops.shar_datasource import reads_dataset

    plain = TypeStream([corpus], "asr_ast", 3, seed=2, rank=0, world_size=2, bucket_batches=2)
    ray_stream = TypeStream([corpus], "asr_ast", 3, seed=2, rank=0, world_size=2, bucket_batches=2,
                            open_rows=lambda reads: reads_dataset(reads).iter_rows())
    assert _ids(ray_stream, 14) == _ids(plain, 14)
    assert ray_stream.epoch >= 2


@pytest.fixture
def capped_corpus(tmp_path, pcm_audio):
    """12 short utterances, one of 2 s audio and one with a long answer, in 3 shards of 5, 5, 4."""
    rng = np.random.default_rng(1)
    convs = {f"u{i:02d}": (float(rng.uniform(0.1, 0.6)), f"u{i}") for i in range(12)}
    convs["long-audio"] = (2.0, "a")
    convs["long-text"] = (0.3, " ".join(["hello world"] * 40))
    order = sorted(convs)  # the long ones sit between short ones, in the middle of a shard
    order.insert(6, order.pop(order.index("long-audio")))
    cuts = [conversation_to_cut(
        Conversation([Turn("user", [AudioPart(pcm_audio(convs[k][0], i)), TextPart("T.")]),
                      Turn.text("assistant", convs[k][1])]),
        cut_id=k, data_type="asr_ast", task="asr", langs=["en"]) for i, k in enumerate(order)]
    with ShardWriter(str(tmp_path), shard_size=5, progress=False) as w:
        w.write("asr_ast", cuts)
    return str(tmp_path)


def _epoch(stream) -> list[list[str]]:
    """The ids of the batches of the stream's current epoch, from its start."""
    out, epoch = [], stream.epoch
    while True:
        batch = stream.next_batch()
        if stream.epoch != epoch:
            stream.pending.insert(0, batch)  # the next epoch's first batch: give it back
            return out
        out.append([r["id"] for r in batch])


def test_samples_over_a_cap_are_skipped_before_batching_counted_and_resume_exactly(capped_corpus, make_model):
    from data_ops.shar_datasource import iter_corpus_rows, row_to_conversation

    processor = make_model().processor  # LM positions as the model will see them: chat template + audio frames
    tokens = {r["id"]: len(processor.encode(row_to_conversation(r))) for r in iter_corpus_rows(capped_corpus, "asr_ast")}
    cap = max(n for k, n in tokens.items() if k != "long-text") + 1
    assert tokens["long-text"] > cap
    kw = dict(seed=3, max_audio_s=1.0, max_tokens=cap,
              count_tokens=lambda row: len(processor.encode(row_to_conversation(row))))

    capped = TypeStream([capped_corpus], "asr_ast", 3, bucket_batches=5, **kw)  # one fill reads the whole epoch
    epoch = [[r["id"] for r in capped.next_batch()]]
    assert capped.skipped == {"max_sample_audio_s": 1, "max_sample_tokens": 1}
    assert capped.state_dict()["skipped"] == {"max_sample_audio_s": 1, "max_sample_tokens": 1}
    epoch += _epoch(capped)
    assert sorted(i for b in epoch for i in b) == sorted(k for k in tokens if not k.startswith("long"))  # once
    assert [len(b) for b in epoch] == [3, 3, 3, 3]  # batches keep their size: the skipped rows left no hole

    kw["bucket_batches"] = 2  # batches pending across fills, and checkpoints between them
    reference = TypeStream([capped_corpus], "asr_ast", 3, **kw)
    want = _ids(reference, 12)  # into the third epoch
    first = TypeStream([capped_corpus], "asr_ast", 3, **kw)
    head = _ids(first, 5)
    state = first.state_dict()
    _ids(first, 2)  # lost with the crash
    resumed = TypeStream([capped_corpus], "asr_ast", 3, **kw)
    resumed.load_state_dict(state)
    assert head + _ids(resumed, 7) == want
    assert resumed.skipped == reference.skipped and reference.skipped["max_sample_audio_s"] >= 2  # counted per epoch


def test_a_cap_that_leaves_nothing_fails_clearly_instead_of_spinning(capped_corpus):
    stream = TypeStream([capped_corpus], "asr_ast", 3, seed=0, max_audio_s=0.01)
    with pytest.raises(RuntimeError, match="no usable rows.*max_sample_audio_s"):
        stream.next_batch()
    with pytest.raises(ValueError, match="needs count_tokens"):
        TypeStream([capped_corpus], "asr_ast", 3, seed=0, max_tokens=10)


# -- budget batches ------------------------------------------------------------------------------------------------

def _budget_epoch(stream) -> list[list[dict]]:
    """The rows of the batches of the stream's current epoch, from its start."""
    out, epoch = [], stream.epoch
    while True:
        batch = stream.next_batch()
        if stream.epoch != epoch:
            stream.pending.insert(0, batch)
            return out
        out.append(batch)


@pytest.mark.parametrize("world_size", [1, 2])
def test_budget_batches_stay_within_the_budget_and_hand_out_every_row_once(corpus, world_size):
    """Padded audio (count x longest clip) never over the budget, at most `batch_size` rows, sizes that follow the
    clips' lengths, and every row once an epoch over the ranks."""
    seen, sizes = Counter(), set()
    for rank in range(world_size):
        stream = TypeStream([corpus], "asr_ast", 6, seed=4, rank=rank, world_size=world_size, bucket_batches=3,
                            max_batch_audio_s=1.5)
        for batch in _budget_epoch(stream):
            durations = [r["duration"] for r in batch]
            assert len(batch) * max(durations) <= 1.5 and len(batch) <= 6, durations
            sizes.add(len(batch))
            seen.update(r["id"] for r in batch)
    assert sorted(seen) == [f"u{i:02d}" for i in range(29)] and set(seen.values()) == {1}
    assert len(sizes) >= 3, sizes  # short clips travel in larger batches than long ones


@pytest.mark.parametrize("stop_after", [1, 4, 9, 15])
def test_budget_batches_resume_exactly(corpus, stop_after):
    """Pending batches of varying sizes restore as they were; across epoch boundaries too."""
    kw = dict(seed=9, rank=1, world_size=2, bucket_batches=2, max_batch_audio_s=1.0)
    reference = _ids(TypeStream([corpus], "asr_ast", 5, **kw), 24)
    assert len({len(b) for b in reference}) >= 2
    first = TypeStream([corpus], "asr_ast", 5, **kw)
    head = _ids(first, stop_after)
    state = first.state_dict()
    _ids(first, 2)  # lost with the crash
    resumed = TypeStream([corpus], "asr_ast", 5, **kw)
    resumed.load_state_dict(state)
    assert head + _ids(resumed, 24 - stop_after) == reference


def test_a_sample_over_the_budget_alone_is_skipped_and_counted_as_the_caps_do(capped_corpus, make_model):
    from data_ops.shar_datasource import iter_corpus_rows, row_to_conversation

    processor = make_model().processor
    count = lambda row: len(processor.encode(row_to_conversation(row)))  # noqa: E731
    tokens = {r["id"]: count(r) for r in iter_corpus_rows(capped_corpus, "asr_ast")}
    budget = 2 * max(n for k, n in tokens.items() if k != "long-text")
    assert tokens["long-text"] > budget
    stream = TypeStream([capped_corpus], "asr_ast", 4, seed=3, bucket_batches=4, max_batch_audio_s=1.5,
                        max_batch_tokens=budget, count_tokens=count)
    epoch = [stream.next_batch()]  # one fill reads the whole epoch (14 rows)
    assert stream.skipped == {"max_batch_audio_s": 1, "max_batch_tokens": 1}  # long-audio (2 s), long-text
    epoch += _budget_epoch(stream)
    assert sorted(r["id"] for b in epoch for r in b) == sorted(k for k in tokens if not k.startswith("long"))
    for batch in epoch:
        assert len(batch) * max(r["duration"] for r in batch) <= 1.5
        assert len(batch) * max(tokens[r["id"]] for r in batch) <= budget
    assert {len(b) for b in epoch} != {4}  # the token budget cut batches below the most rows
    # a per-sample cap counts first, as it always did
    capped = TypeStream([capped_corpus], "asr_ast", 4, seed=3, bucket_batches=4, max_audio_s=1.0,
                        max_batch_audio_s=1.5)
    capped.next_batch()
    assert capped.skipped == {"max_sample_audio_s": 1}
    with pytest.raises(ValueError, match="token budget.*needs count_tokens"):
        TypeStream([capped_corpus], "asr_ast", 3, seed=0, max_batch_tokens=100)
