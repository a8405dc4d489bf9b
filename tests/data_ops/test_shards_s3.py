"""All four data types as Shar shards on a real S3 endpoint (moto on loopback), streamed back with Ray Data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from data_ops.schema import conversation_to_cut
from data_ops.shar_datasource import is_error_row, plan_reads, row_to_conversation, shar_dataset
from data_ops.shards import ShardWriter, read_manifest

pytestmark = pytest.mark.integration


def test_four_types_round_trip_through_s3_with_ray_data(s3_endpoint, ray_local, corpus_conversations):
    corpus = corpus_conversations
    uri = "s3://vtb-test/corpus-a"
    with ShardWriter(uri, shard_size=2, progress=False) as w:
        for dt in ("text", "asr_ast", "sqa", "mixed_modal"):
            w.write(dt, (conversation_to_cut(c, cut_id=cid, data_type=dt, task=dt, langs=["en"])
                         for cid, (t, c) in corpus.items() if t == dt))
    manifest = read_manifest(uri)
    assert {n: t.num_cuts for n, t in manifest.types.items()} == {"text": 7, "asr_ast": 9, "sqa": 5, "mixed_modal": 6}
    assert len(manifest.types["asr_ast"].shards) == 5
    want_seconds = sum(p.duration for t, c in corpus.values() if t == "asr_ast" for p in c.audio_parts)
    assert manifest.types["asr_ast"].hours * 3600 == pytest.approx(want_seconds, abs=1e-4)
    assert manifest.types["text"].hours == 0.0

    for dt in ("text", "asr_ast", "sqa", "mixed_modal"):
        orders = []
        for epoch in (0, 1):
            rows = list(shar_dataset(uri, dt, seed=7, epoch=epoch).iter_rows())
            assert not any(is_error_row(r) for r in rows)
            ids = [r["id"] for r in rows]
            want = sorted(cid for cid, (t, _) in corpus.items() if t == dt)
            assert sorted(ids) == want, f"{dt} epoch {epoch}: every row exactly once"
            orders.append([r.key for r in plan_reads(uri, dt, seed=7, epoch=epoch)])
            for r in rows:
                got, want_conv = row_to_conversation(r), corpus[r["id"]][1]
                assert [t.text_only for t in got.turns] == [t.text_only for t in want_conv.turns]
                assert len(got.audio_parts) == len(want_conv.audio_parts)
                for g, w_ in zip(got.audio_parts, want_conv.audio_parts):
                    np.testing.assert_array_equal(g.audio, w_.audio)  # bit-identical samples
                assert r["data_type"] == dt and json.loads(r["langs"]) == ["en"]
        assert sorted(orders[0]) == sorted(orders[1])
        if len(orders[0]) > 2:  # 3+ shards: over 6 epochs the seeded order must change
            many = {tuple(r.key for r in plan_reads(uri, dt, seed=7, epoch=e)) for e in range(6)}
            assert len(many) > 1, "shard order is reshuffled per epoch"
    # the same seed and epoch give the same order (every worker agrees)
    assert [r.key for r in plan_reads(uri, "asr_ast", seed=7, epoch=1)] == \
        [r.key for r in plan_reads(uri, "asr_ast", seed=7, epoch=1)]


def test_resume_offsets_skip_consumed_rows(s3_endpoint, ray_local, corpus_conversations):
    corpus = corpus_conversations
    uri = "s3://vtb-test/corpus-b"
    with ShardWriter(uri, shard_size=4, progress=False) as w:
        w.write("asr_ast", (conversation_to_cut(c, cut_id=cid, data_type="asr_ast", task="asr", langs=["en"])
                            for cid, (t, c) in corpus.items() if t == "asr_ast"))
    shards = read_manifest(uri).types["asr_ast"].shards  # 4 + 4 + 1 cuts
    key = [f"{uri}/{s.cuts}" for s in shards]
    start = {key[0]: 3, key[2]: 1}  # 3 of shard 0 and all of shard 2 already consumed
    rows = list(shar_dataset(uri, "asr_ast", start=start).iter_rows())
    got = {(r["shard"], r["index"]) for r in rows}
    assert got == {(key[0], 3)} | {(key[1], i) for i in range(4)}
    # two ranks split 3 shards by whole shards; skip drops single consumed rows
    r0 = plan_reads(uri, "asr_ast", rank=0, world_size=2, skip={key[1]: {0, 2}})
    r1 = plan_reads(uri, "asr_ast", rank=1, world_size=2, skip={key[1]: {0, 2}})
    rows = [row for r in r0 + r1 for row in r.rows()]
    assert sorted((row["shard"], row["index"]) for row in rows) == sorted(
        [(key[0], i) for i in range(4)] + [(key[1], 1), (key[1], 3)] + [(key[2], 0)])
    assert not {r.key for r in r0} & {r.key for r in r1}


def test_demo_corpus_on_s3(s3_endpoint, ray_local):
    from data_ops.demo_corpus import SIZES, build_demo_corpus

    uri = "s3://vtb-test/demo"
    size = dataclasses.replace(SIZES["tiny"], spoken_tasks=3, instruction_speech=4)
    manifest = build_demo_corpus(uri, size, seed=3, shard_size=8, progress=False)
    counts = {n: t.num_cuts for n, t in manifest.types.items()}
    assert counts["text"] == size.text and counts["mixed_modal"] == size.mixed + size.spoken_tasks
    # ASR for each template utterance, AST for every other; ASR only for the spoken instructions
    assert counts["asr_ast"] == size.speech + size.speech // 2 + size.instruction_speech
    assert 0 < counts["sqa"] <= size.sqa
    assert manifest.types["asr_ast"].tasks == {"asr": size.speech + size.instruction_speech, "ast": size.speech // 2}
    langs = set()
    for dt in counts:
        for r in shar_dataset(uri, dt).iter_rows():
            assert not is_error_row(r), r["error"]
            conv = row_to_conversation(r)
            langs.update(json.loads(r["langs"]))
            if dt != "text":
                assert conv.audio_parts and all(p.duration > 0.3 for p in conv.audio_parts)
            if r["id"].startswith("utt-instr-"):  # an instruction read out: English ASR of a text task's turn
                assert r["task"] == "asr" and json.loads(r["langs"]) == ["en"]
                assert not any(t in conv.turns[-1].text_only for t in ("The number is", "Today is", "My name is"))
            if r["id"].startswith("mixed-task-"):  # a one-sentence task: its whole user turn is spoken
                user = next(t for t in conv.turns if t.role == "user")
                assert len(user.parts) == 1 and user.audio_parts, conv
    assert langs == {"en", "de", "es", "fr"}
