"""A network fault is not bad data: S3 reads that fail mid-shard resume at the same byte after the endpoint comes
back, and when it does not come back the read stops loudly, naming the object; no row is ever skipped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_ops.schema import conversation_to_cut
from data_ops.shar_datasource import is_error_row, iter_shard_rows, plan_reads, reads_dataset
from data_ops.shards import ShardWriter, read_manifest
from data_ops.storage import RetryPolicy, S3Storage, StorageUnavailable
from models.conversation import AudioPart, Conversation, TextPart, Turn
from tests.data_ops.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

FAST_RETRY = RetryPolicy(attempts=8, first_wait_s=0.2, max_wait_s=1.0)


@pytest.fixture(scope="module")
def corpus(stack):
    """One ASR shard of 40 cuts (about 1.3 MB of FLAC) and the rows a fault-free read gives."""
    import os

    from infra.stack import S3_CREDENTIALS

    os.environ.update(S3_CREDENTIALS)
    uri = "s3://vtb-test/faults"
    rng = np.random.default_rng(0)
    cuts = []
    for i in range(40):
        audio = (rng.integers(-20000, 20000, 24000) / 32768.0).astype(np.float32)
        conv = Conversation([Turn("user", [AudioPart(audio), TextPart("Transcribe.")]), Turn.text("assistant", f"w{i}")])
        cuts.append(conversation_to_cut(conv, cut_id=f"cut-{i:02d}", data_type="asr_ast", task="asr", langs=["en"]))
    with ShardWriter(uri, shard_size=40, endpoint_url=stack.urls["s3"], progress=False) as w:
        w.write("asr_ast", iter(cuts))
    shard = read_manifest(uri, stack.urls["s3"]).types["asr_ast"].shards[0]
    clean = list(iter_shard_rows(S3Storage(uri, stack.urls["s3"]), shard, "asr_ast"))
    assert len(clean) == 40 and not any(is_error_row(r) for r in clean)
    return {"uri": uri, "shard": shard, "clean": clean, "s3": stack.urls["s3"]}


@pytest.fixture
def proxy(corpus):
    host, port = corpus["s3"].removeprefix("http://").split(":")
    p = FaultProxy(host, int(port))
    yield p
    p.close()


def test_a_read_cut_mid_shard_resumes_at_the_same_byte(corpus, proxy):
    storage = S3Storage(corpus["uri"], proxy.url, retry=FAST_RETRY)
    proxy.fault(after_bytes=400_000, down_s=2.0)  # mid-tar: the endpoint goes away for 2 s
    rows = list(iter_shard_rows(storage, corpus["shard"], "asr_ast"))
    assert proxy.faults == 1 and proxy.refused >= 1  # the fault happened, and retries met the outage
    assert not any(is_error_row(r) for r in rows)
    assert [r["index"] for r in rows] == list(range(40))  # every row once, in order
    assert [r["audio"] for r in rows] == [r["audio"] for r in corpus["clean"]]  # the same bytes


def test_an_endpoint_that_stays_away_stops_the_read_naming_the_object(corpus, proxy):
    storage = S3Storage(corpus["uri"], proxy.url, retry=RetryPolicy(attempts=3, first_wait_s=0.1, max_wait_s=0.2))
    proxy.fault(after_bytes=400_000, down_s=None)
    rows = []
    with pytest.raises(StorageUnavailable, match=r"s3://vtb-test/faults/asr_ast/.*failed 3 times"):
        for row in iter_shard_rows(storage, corpus["shard"], "asr_ast"):
            rows.append(row)
    # what was read (the fault may come before the first row) is good: nothing was turned into an error row
    assert not any(is_error_row(r) for r in rows)
    assert [r["index"] for r in rows] == list(range(len(rows)))


def test_ray_data_stream_survives_an_endpoint_restart(corpus, proxy, ray_local):
    # the read tasks go through the proxy, with retries quick enough for a test
    reads = [dataclasses.replace(r, storage=S3Storage(corpus["uri"], proxy.url, retry=FAST_RETRY))
             for r in plan_reads(corpus["uri"], "asr_ast", endpoint_url=corpus["s3"])]
    proxy.fault(after_bytes=600_000, down_s=2.0)
    rows = list(reads_dataset(reads).iter_rows())
    assert proxy.faults == 1
    assert not any(is_error_row(r) for r in rows)
    assert sorted(r["id"] for r in rows) == [f"cut-{i:02d}" for i in range(40)]
