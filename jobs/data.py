"""Data jobs: make, import and derive the four SFT data types as Shar shards (local folder or s3://bucket/prefix).

    python -m jobs.data demo        --out s3://bucket/demo --size small
    python -m jobs.data import-asr  --out DIR --table utts.tsv [--lang en --target-lang de]
    python -m jobs.data import-asr  --out DIR --cuts cuts.jsonl.gz | --recordings R --supervisions S
    python -m jobs.data import-asr  --out DIR --hf-dataset ./common_voice_de --layout commonvoice [--lang de]
    python -m jobs.data import-asr  --out DIR --hf-dataset s3://bucket/datasets/fleurs_de --layout fleurs --lang de
    python -m jobs.data import-asr  --out DIR --nemo-tarred tarred_audio_manifest.json --tars 'audio_{0..7}.tar'
    python -m jobs.data import-asr  --out DIR --shar SHAR_DIR --lang en
    python -m jobs.data import-text --out DIR --jsonl sft.jsonl | --hf-dataset ./sft_dataset [--messages-column m]
    python -m jobs.data import-nemo --out DIR --manifest m.jsonl --data-type mixed_modal --task mixed_modal --langs en
    python -m jobs.data sqa         --out DIR --asr-corpus DIR --work DIR --base-url URL --model NAME
    python -m jobs.data mixed-modal --out DIR --jsonl single_turn_sft.jsonl
    python -m jobs.data info        DIR

Each writes one corpus (shards + manifest.json). Runs locally or under `ray job submit`; S3 endpoints come from
`--endpoint-url` or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from data_ops.demo_corpus import SIZES
from data_ops.importers import (HF_LAYOUTS, ImportReport, read_audio_table, read_hf_speech_dataset,
                                read_hf_text_dataset, read_lhotse_manifests, read_lhotse_shar, read_messages_jsonl,
                                read_nemo_tarred)
from data_ops.schema import DATA_TYPES, SchemaError
from data_ops.shards import ManifestError, ShardWriter, read_manifest
from data_ops.storage import StorageError
from jobs.common.console import quiet_console

logger = logging.getLogger("vtblender.data")


def _ray_init():
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)  # noqa: TID251 - an entrypoint connects to Ray


def _report(report: ImportReport) -> None:
    print(f"kept {report.kept} cuts, skipped {len(report.skipped)}")
    for message in report.skipped[:20]:
        print(f"  skipped: {message}")


def cmd_demo(a) -> None:
    from data_ops.demo_corpus import build_demo_corpus

    _ray_init()
    manifest = build_demo_corpus(a.out, a.size, seed=a.seed, shard_size=a.shard_size, concurrency=a.concurrency,
                                 endpoint_url=a.endpoint_url, split=a.split)
    print(f"[data] demo corpus at {a.out}: {manifest.summary()}")


def cmd_import_asr(a) -> None:
    report = ImportReport()
    if a.table:
        cuts = read_audio_table(a.table, lang=a.lang, target_lang=a.target_lang, report=report)
    elif a.nemo_tarred:
        if not a.tars:
            raise SystemExit("error: --nemo-tarred needs --tars (e.g. 'audio_{0..7}.tar')")
        cuts = read_nemo_tarred(a.nemo_tarred, a.tars, text_key=a.text_key, lang=a.lang, target_lang=a.target_lang,
                                report=report)
    elif a.shar:
        cuts = read_lhotse_shar(a.shar, lang=a.lang, target_lang=a.target_lang, report=report)
    elif a.hf_dataset:
        cuts = read_hf_speech_dataset(a.hf_dataset, layout=a.layout, audio_column=a.audio_column,
                                      text_column=a.text_column, translation_column=a.translation_column,
                                      lang_column=a.lang_column, id_column=a.id_column, lang=a.lang,
                                      target_lang=a.target_lang, report=report, endpoint_url=a.endpoint_url)
    else:
        cuts = read_lhotse_manifests(a.cuts, recordings=a.recordings, supervisions=a.supervisions, lang=a.lang,
                                     target_lang=a.target_lang, report=report)
    with ShardWriter(a.out, shard_size=a.shard_size, endpoint_url=a.endpoint_url) as w:
        w.write("asr_ast", cuts)
    _report(report)


def cmd_import_text(a) -> None:
    report = ImportReport()
    with ShardWriter(a.out, shard_size=a.shard_size, endpoint_url=a.endpoint_url) as w:
        w.write("text", read_messages_jsonl(a.jsonl, lang=a.lang, report=report) if a.jsonl else
                read_hf_text_dataset(a.hf_dataset, messages_column=a.messages_column, lang=a.lang, report=report,
                                     endpoint_url=a.endpoint_url))
    _report(report)


def cmd_import_nemo(a) -> None:
    from data_ops.nemo_manifest import read_nemo_manifest

    with ShardWriter(a.out, shard_size=a.shard_size, endpoint_url=a.endpoint_url) as w:
        w.write(a.data_type, read_nemo_manifest(a.manifest, data_type=a.data_type, task=a.task, langs=a.langs))


def cmd_sqa(a) -> None:
    from data_ops.shar_datasource import iter_corpus_rows, iter_cut_dicts, is_error_row, row_to_conversation
    from data_ops.llm_client import ChatEndpoint
    from data_ops.sqa import english_asr_transcripts, generate_sqa, sqa_cuts

    _ray_init()
    endpoint = ChatEndpoint(base_url=a.base_url, model=a.model, api_key_env=a.api_key_env,
                            max_retries=a.max_retries)
    items = english_asr_transcripts(iter_cut_dicts(a.asr_corpus, "asr_ast", endpoint_url=a.endpoint_url))
    summary, kept = generate_sqa(items, endpoint, a.work, concurrency=a.concurrency, endpoint_url=a.endpoint_url)
    print(f"speech QA: {json.dumps(summary.as_dict())}")
    rows = (r for r in iter_corpus_rows(a.asr_corpus, "asr_ast", endpoint_url=a.endpoint_url)
            if not is_error_row(r) and r["id"] in kept)
    with ShardWriter(a.out, shard_size=a.shard_size, endpoint_url=a.endpoint_url) as w:
        w.write("sqa", sqa_cuts(((r["id"], row_to_conversation(r)) for r in rows), kept))


def cmd_mixed_modal(a) -> None:
    from data_ops.mixed_modal import mixed_modal_dataset, mixed_modal_row_to_cut
    from data_ops.schema import cut_to_conversation

    _ray_init()
    report = ImportReport()
    rows = [{"id": c.id, "lang": a.lang, "conversation": json.dumps(cut_to_conversation(c).to_dict())}
            for c in read_messages_jsonl(a.jsonl, lang=a.lang, report=report)]
    errors = []

    def cuts():
        for row in mixed_modal_dataset(rows, seed=a.seed, concurrency=a.concurrency).iter_rows():
            if row["error"]:
                errors.append(f"{row['id']}: {row['error']}")
                continue
            yield mixed_modal_row_to_cut(row)

    with ShardWriter(a.out, shard_size=a.shard_size, endpoint_url=a.endpoint_url) as w:
        info = w.write("mixed_modal", cuts())
    print(f"mixed-modal: {info.num_cuts} cuts; {len(errors)} not converted, {len(report.skipped)} lines unreadable")
    for message in (errors + report.skipped)[:20]:
        print(f"  skipped: {message}")


def cmd_info(a) -> None:
    print(read_manifest(a.uri, a.endpoint_url).to_json())


def _import_asr_arguments(c) -> None:
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="CSV/TSV: audio_path,text[,translation,lang,target_lang]")
    src.add_argument("--cuts", help="a Lhotse cuts manifest")
    src.add_argument("--recordings", help="a Lhotse recordings manifest (with --supervisions)")
    src.add_argument("--hf-dataset",
                     help="a Hugging Face dataset folder or file (parquet, or arrow from save_to_disk), local or s3://")
    src.add_argument("--nemo-tarred", help="a NeMo tarred dataset's manifest (with --tars)")
    src.add_argument("--shar", help="a Lhotse Shar directory with supervisions (as NeMo's Lhotse dataloading uses)")
    c.add_argument("--tars", help="--nemo-tarred: the tar files, NeMo's pattern (audio_{0..7}.tar)")
    c.add_argument("--text-key", default="text", help="--nemo-tarred: the manifest's transcript field")
    c.add_argument("--supervisions")
    c.add_argument("--lang")
    c.add_argument("--target-lang")
    c.add_argument("--layout", choices=sorted(HF_LAYOUTS), help="--hf-dataset: a known dataset's column names")
    c.add_argument("--audio-column", default="audio")
    c.add_argument("--text-column")
    c.add_argument("--translation-column")
    c.add_argument("--lang-column")
    c.add_argument("--id-column")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, **kw):
        c = sub.add_parser(name, **kw)
        c.set_defaults(fn=fn)
        c.add_argument("--endpoint-url", default=None, help="S3 endpoint (else AWS_ENDPOINT_URL)")
        return c

    def writer(c):
        c.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
        c.add_argument("--shard-size", type=int, default=500)
        return c

    c = command("demo", cmd_demo, help="generate the self-contained demo corpus (all four types)")
    writer(c)
    c.add_argument("--size", default="small", choices=list(SIZES))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--split", default="train", choices=["train", "eval"],
                   help="eval: held-out voices and a spoken-instruction set (use another --seed than training)")
    c.add_argument("--concurrency", type=int, default=2, help="TTS actors")

    _import_asr_arguments(writer(command("import-asr", cmd_import_asr, help="ASR/AST corpus -> asr_ast shards")))

    c = command("import-text", cmd_import_text, help="OpenAI-style messages (JSONL or a HF dataset) -> text shards")
    writer(c)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl")
    src.add_argument("--hf-dataset", help="a Hugging Face dataset folder or file with a messages column, local or "
                     "s3://")
    c.add_argument("--messages-column", default="messages")
    c.add_argument("--lang", default="en")

    c = command("import-nemo", cmd_import_nemo, help="NeMo multimodal_conversation manifest -> shards")
    writer(c)
    c.add_argument("--manifest", required=True)
    c.add_argument("--data-type", required=True, choices=DATA_TYPES)
    c.add_argument("--task", required=True)
    c.add_argument("--langs", nargs="+", default=["en"])

    c = command("sqa", cmd_sqa, help="speech QA from English ASR shards via an OpenAI-compatible endpoint")
    writer(c)
    c.add_argument("--asr-corpus", required=True)
    c.add_argument("--work", required=True, help="folder for partial results (resume)")
    c.add_argument("--base-url", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--api-key-env", default="OPENAI_API_KEY")
    c.add_argument("--concurrency", type=int, default=4)
    c.add_argument("--max-retries", type=int, default=4)

    c = command("mixed-modal", cmd_mixed_modal, help="single-turn text SFT JSONL -> mixed-modal shards (TTS)")
    writer(c)
    c.add_argument("--jsonl", required=True)
    c.add_argument("--lang", default="en")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--concurrency", type=int, default=2)

    c = command("info", cmd_info, help="print a corpus manifest")
    c.add_argument("uri")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_console(os.environ)
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except (SchemaError, ManifestError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
