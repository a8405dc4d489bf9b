"""The recipe's per-sample caps (`data.max_sample_audio_s`, `data.max_sample_tokens`) on the training side: the
driver's data summary counts the cuts over the audio cap before any worker starts, and the worker's streams skip
the samples over either cap, log each new count once and report them as metrics. (How a stream skips, counts and
resumes: tests/data_ops/test_mix_sampler.py.)"""

from __future__ import annotations

from data_ops.shar_datasource import iter_corpus_rows, row_to_conversation
from jobs.recipe import parse_recipe
from jobs.training.batches import BatchPrefetcher
from jobs.training.plan import resolve
from jobs.training.preflight import check_data
from jobs.training.sft import WorkerJob, open_streams, skipped_samples
from tests.data_ops.test_mix_sampler import capped_corpus  # noqa: F401 (a fixture)


def _recipe(uri: str, budget: dict | None = None, **caps):
    return parse_recipe({"run": {"name": "t"}, "model": {"size": "tiny"},
                         "data": {"sources": {"asr_ast": {"uris": [uri], "ratio": 1.0, "batch_size": 3,
                                                          **(budget or {})}},
                                  "bucket_batches": 5, **caps},  # one fill reads a whole epoch (14 rows)
                         "train": {"max_steps": 3}})


def test_caps_are_counted_before_training_and_skips_are_logged_and_reported(capped_corpus, make_model,  # noqa: F811
                                                                            capsys):
    assert "over_max_sample_audio_s" not in check_data(resolve(_recipe(capped_corpus))).summary["asr_ast"]
    capped = check_data(resolve(_recipe(capped_corpus, max_sample_audio_s=1.0))).summary
    assert capped["asr_ast"]["over_max_sample_audio_s"] == 1

    processor = make_model().processor
    tokens = {r["id"]: len(processor.encode(row_to_conversation(r))) for r in iter_corpus_rows(capped_corpus, "asr_ast")}
    cap = max(n for k, n in tokens.items() if k != "long-text") + 1
    recipe = _recipe(capped_corpus, max_sample_audio_s=1.0, max_sample_tokens=cap)
    plan = resolve(recipe)
    job = WorkerJob(plan=plan, stage=plan.stages[0], tokenizer_files=None, tracking_uri="", mlflow_run_id="")
    streams = open_streams(plan, plan.stages[0], 0, 1, processor)
    streams["asr_ast"].open_rows = lambda reads: (row for r in reads for row in r.rows())  # in-process, no Ray
    prefetch = BatchPrefetcher(streams, lambda step, micro: "asr_ast", lambda rows: {}, start_step=0, grad_accum=1)
    try:
        logged: dict = {}
        assert len(prefetch.next().rows) == 3
        metrics = skipped_samples(job, prefetch, 1, "cpu", logged)
        first = capsys.readouterr().out
        for _ in range(4):  # the rest of the first epoch, and the second's first batch: skipped again
            prefetch.next()
        again = skipped_samples(job, prefetch, 1, "cpu", logged)
        second = capsys.readouterr().out
        assert skipped_samples(job, prefetch, 1, "cpu", None) == again and capsys.readouterr().out == ""
    finally:
        prefetch.close()
    assert metrics == {"data/skipped/asr_ast/max_sample_audio_s": 1.0, "data/skipped/asr_ast/max_sample_tokens": 1.0}
    assert "[train] skipped 1 asr_ast samples over max_sample_audio_s=1 (1 in all)" in first
    assert f"[train] skipped 1 asr_ast samples over max_sample_tokens={cap} (1 in all)" in first
    assert again == {"data/skipped/asr_ast/max_sample_audio_s": 2.0, "data/skipped/asr_ast/max_sample_tokens": 2.0}
    assert "skipped 1 asr_ast samples over max_sample_audio_s=1 (2 in all)" in second  # only what is new


def test_budgets_reach_the_streams_and_their_skips_are_reported(capped_corpus, make_model, capsys):  # noqa: F811
    """A type's budget (`max_batch_audio_s`, `max_batch_tokens`) shapes its batches and a sample over it alone is
    skipped and reported like a cap's (`data/skipped/<type>/max_batch_*`)."""
    processor = make_model().processor
    tokens = {r["id"]: len(processor.encode(row_to_conversation(r))) for r in iter_corpus_rows(capped_corpus, "asr_ast")}
    budget = 2 * max(n for k, n in tokens.items() if k != "long-text")
    recipe = _recipe(capped_corpus, budget={"max_batch_audio_s": 1.5, "max_batch_tokens": budget})
    plan = resolve(recipe)
    job = WorkerJob(plan=plan, stage=plan.stages[0], tokenizer_files=None, tracking_uri="", mlflow_run_id="")
    streams = open_streams(plan, plan.stages[0], 0, 1, processor)
    assert (streams["asr_ast"].max_batch_audio_s, streams["asr_ast"].max_batch_tokens) == (1.5, budget)
    streams["asr_ast"].open_rows = lambda reads: (row for r in reads for row in r.rows())  # in-process, no Ray
    prefetch = BatchPrefetcher(streams, lambda step, micro: "asr_ast", lambda rows: {}, start_step=0, grad_accum=1)
    try:
        rows = prefetch.next().rows
        metrics = skipped_samples(job, prefetch, 1, "cpu", {})
    finally:
        prefetch.close()
    assert len(rows) * max(r["duration"] for r in rows) <= 1.5
    assert len(rows) * max(tokens[r["id"]] for r in rows) <= budget
    assert metrics == {"data/skipped/asr_ast/max_batch_audio_s": 1.0, "data/skipped/asr_ast/max_batch_tokens": 1.0}
    assert "[train] skipped 1 asr_ast samples over max_batch_audio_s=1.5 (1 in all)" in capsys.readouterr().out
