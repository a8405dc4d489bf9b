"""The evaluation job via `ray job submit` on two registered tiny models, then the comparison table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter
from jobs.evaluation.run import logged_samples
from models.conversation import AudioPart, Conversation, TextPart, Turn
from tests.jobs.ray_jobs import submit

# about 5 minutes (two jobs at once, each a vLLM engine on two cores): `make test-slow`, which CI runs too
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _pcm(seconds, seed):
    k = np.random.default_rng(seed).integers(-20000, 20000, size=int(seconds * 16000))
    return (k / 32768.0).astype(np.float32)


def _eval_corpus(root):
    def cut(conv, cid, dt, task, langs):
        return conversation_to_cut(conv, cut_id=cid, data_type=dt, task=task, langs=langs)

    speech = [cut(Conversation([Turn("user", [AudioPart(_pcm(0.5, i), transcript=t), TextPart("Transcribe.")]),
                                Turn.text("assistant", t)]), f"asr-{lang}-{i}", "asr_ast", "asr", [lang])
              for i, (lang, t) in enumerate([("en", "The number is 7."), ("en", "Today is Monday."),
                                             ("de", "Heute ist Montag.")])]
    speech += [cut(Conversation([Turn("user", [AudioPart(_pcm(0.5, 9)), TextPart("Translate.")]),
                                 Turn.text("assistant", "Today is Monday.")]), "ast-0", "asr_ast", "ast", ["de", "en"])]
    with ShardWriter(str(root), shard_size=3, progress=False) as w:
        w.write("text", [cut(Conversation([Turn.text("user", f"What is {i} plus 1?"),
                                           Turn.text("assistant", f"{i} plus 1 is {i + 1}.")]),
                             f"text-{i}", "text", "text", ["en"]) for i in range(4)])
        w.write("asr_ast", speech)
        w.write("sqa", [cut(Conversation([Turn("user", [AudioPart(_pcm(0.4, 20), transcript="My name is Anna."),
                                                        TextPart("What is the speaker's name?")]),
                                          Turn.text("assistant", "Anna.")]), "sqa-0", "sqa", "sqa", ["en"])])
        w.write("mixed_modal", [cut(Conversation([Turn("user", [AudioPart(_pcm(0.6, 30), transcript="Count to 3.")]),
                                                  Turn.text("assistant", "1, 2, 3.")]),
                                    "spoken-0", "mixed_modal", "spoken_instruction", ["en"])])


def test_evaluate_two_models_and_compare(stack, tmp_path, tokenizer):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from models.config import tiny
    from models.speechlm import build_speechlm

    env = stack.env()
    tracking = env["MLFLOW_TRACKING_URI"]
    _eval_corpus(tmp_path / "eval")
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("eval-it")
    mc = MlflowClient(tracking, registry_uri=tracking)
    # both evaluated with bf16 weights, as on a GPU: one model of each encoder kind
    for name, seed, kind in (("model-a", 0, "fastconformer"), ("model-b", 1, "whisper")):
        torch.manual_seed(seed)
        build_speechlm(tiny(encoder_kind=kind), tokenizer=tokenizer).save_pretrained(tmp_path / name)
        with mlflow.start_run(run_name=name) as run:  # stands in for a training run
            mlflow.log_artifacts(str(tmp_path / name), "model")
        mc.create_registered_model(name)
        v = mc.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
        mc.set_registered_model_alias(name, "candidate", v.version)
    suite = tmp_path / "suite.yaml"
    suite.write_text((ROOT / "jobs/suites/demo.yaml").read_text())

    from concurrent.futures import ThreadPoolExecutor

    def evaluate(name):  # two Ray jobs at once on the cluster, as two users would submit them
        return submit(env, ["python", "-m", "jobs.evaluate", "--model", f"models:/{name}@candidate", "--suite",
                            str(suite), "--uris", str(tmp_path / "eval"), "--precision", "bf16"], f"eval-{name}",
                      timeout=600)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(evaluate, ("model-a", "model-b")))
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "[eval] demo/asr: samples 3, wer_de" in proc.stdout
        assert "weights in bfloat16" in proc.stdout

    exp = mc.get_experiment_by_name("eval-it")
    runs = {r.info.run_name: r for r in mc.search_runs([exp.experiment_id])}
    for name in ("model-a", "model-b"):
        m = runs[name].data.metrics  # logged to the model's own (training) run
        assert m["eval/demo/asr/samples"] == 3 and "eval/demo/asr/wer_en" in m and "eval/demo/asr/wer_de" in m
        assert "eval/demo/ast/bleu_de-en" in m and "eval/demo/text/exact_match" in m
        assert 0 < m["eval/demo/text/answer_loss"] < 20 and 0 < m["eval/demo/asr/answer_loss"] < 20
        assert m["eval/demo/sqa/judge_unscored"] == 1  # no judge configured: reported, not faked
        assert m["eval/demo/spoken_instruction/samples"] == 1
        # the spoken instruction asked to be transcribed, scored against what it says
        assert m["eval/demo/spoken_instruction_heard/samples"] == 1 and "eval/demo/spoken_instruction_heard/wer" in m
        table = json.loads(mlflow.artifacts.load_text(f"runs:/{runs[name].info.run_id}/eval/demo/samples.json"))
        assert len(table["data"]) == 11 and "prediction" in table["columns"]
        # read back per task, as the ablation's per-sample statistics do
        asr = logged_samples(mc, runs[name].info.run_id, "demo", "asr")
        assert [r["id"] for r in asr] == ["asr-de-2", "asr-en-0", "asr-en-1"] and {r["task"] for r in asr} == {"asr"}

    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "jobs.compare", "--experiment", "eval-it", "--suite", "demo", "--out",
                           str(out), "--metrics", "eval/demo/asr/wer", "eval/demo/text/exact_match",
                           "eval/demo/ast/bleu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking})
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "comparison.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("| model | asr/wer ↓ | text/exact_match ↑ | ast/bleu ↑ |")
    assert {lines[2].split("|")[1].strip(), lines[3].split("|")[1].strip()} == {"model-a", "model-b"}
    wers = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[2:]}
    best = min(wers, key=lambda k: float(wers[k].strip("*")))
    assert wers[best].startswith("**") or wers["model-a"] == wers["model-b"]
    assert (out / "comparison.png").stat().st_size > 1000
    cmp_runs = mc.search_runs([exp.experiment_id], filter_string="tags.`vtb.kind` = 'comparison'")
    assert len(cmp_runs) == 1
    assert {a.path for a in mc.list_artifacts(cmp_runs[0].info.run_id)} == {"comparison.md", "comparison.png"}
