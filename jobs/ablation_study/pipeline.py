"""One seed of the ablation, top to bottom (`run_seed`): corpora, the text LM (trained, then exported as a Hugging
Face checkpoint), the CTC-pretrained encoder, each speech recipe from those two, every model evaluated, then the
table, chart and claims in MLflow and `out/seed-<seed>/result.json`. Each step is skipped when `cache.SeedState`
finds it done from the same inputs. Takes a connected Ray; which cluster is the caller's business."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from jobs.ablation_study.cache import SeedState, recipe_inputs, step_inputs
from jobs.ablation_study.claims import check_claims, spoken_instruction_matches
from jobs.ablation_study.config import REPO, AblationConfig, adapt_recipe
from jobs.ablation_study.memory import PeakMemory
from jobs.recipe import Recipe


def export_text_lm(model_uri: str, tracking_uri: str, out: Path) -> Path:
    """The text LM of a trained (text-only) SpeechLM as a standalone Hugging Face checkpoint with its tokenizer:
    what `lm_pretrained` expects (the same code path as a real Gemma checkpoint)."""
    from tracking.models import load_speechlm

    model = load_speechlm(model_uri, tracking_uri=tracking_uri)
    tmp = out.with_name(out.name + ".partial")
    model.lm.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # complete or absent
    return out


def pretrain_encoder_logged(cfg: AblationConfig, text_lm: Recipe, corpus: str, eval_corpus: str, tokenizer_dir: Path,
                            out: Path, seed: int, tracking_uri: str) -> dict:
    """jobs.pretrain_encoder on the training corpus (targets: the text LM's tokenizer), tracked as its own run."""
    from transformers import AutoTokenizer

    from jobs.training.encoder_pretraining import pretrain_encoder
    from jobs.training.plan import resolve
    from tracking.client import client_for
    from tracking.logs import log_metrics, log_params
    from tracking.runs import create_run

    client = client_for(tracking_uri)
    run_id = create_run(client, cfg.experiment, f"{cfg.name}-encoder-ctc-s{seed}", tags={"vtb.ablation": cfg.name})
    log_params(client, run_id, {"steps": cfg.encoder_steps, "lr": cfg.encoder_lr, "seed": seed, "corpus": corpus})
    try:
        return pretrain_encoder(corpus, resolve(text_lm).model, AutoTokenizer.from_pretrained(tokenizer_dir),
                                out, steps=cfg.encoder_steps, lr=cfg.encoder_lr, seed=seed, eval_corpus=eval_corpus,
                                on_metrics=lambda metrics, step: log_metrics(client, run_id, metrics, step))
    finally:
        client.set_terminated(run_id)


def evaluate_models(state: SeedState, labels: list[str], suite, root: Path, tracking_uri: str, experiment: str):
    """Each model through `jobs.evaluate` on the suite, unless evaluated before from the same model and suite."""
    from jobs.evaluation.run import evaluate_model

    for label in labels:
        uri = state["models"][label]
        inputs = step_inputs(suite.model_dump(mode="json"), root, uri)
        if not state.current(f"evaluated/{label}", inputs):
            res = state.timed(f"eval/{label}", lambda uri=uri: evaluate_model(uri, suite, tracking_uri, experiment))
            state.record(f"evaluated/{label}", res["run_id"], inputs)


def run_seed(cfg: AblationConfig, seed: int, root: Path, out: Path, tracking_uri: str, command: str) -> dict:
    from data_ops.demo_corpus import build_demo_corpus
    from data_ops.shards import ManifestError, read_manifest
    from jobs.evaluation.compare import compare_runs
    from jobs.evaluation.suite import load_suite
    from jobs.training.ray_run import run_training
    from tracking.client import client_for

    t0, memory = time.time(), PeakMemory()
    root.mkdir(parents=True, exist_ok=True)
    state = SeedState(root / f"state-seed{seed}.json")
    timed, timings = state.timed, state.timings

    def corpus(key: str, path: Path, size: str, corpus_seed: int, split: str) -> str:
        try:
            read_manifest(str(path))  # the manifest is written last: present means complete
        except ManifestError:
            timed(key, lambda: build_demo_corpus(str(path), size, seed=corpus_seed, split=split, progress=False))
        return str(path)

    train_corpus = corpus("corpus", root / f"corpus-{cfg.corpus_size}-seed{seed}", cfg.corpus_size, seed, "train")
    eval_corpus = corpus("eval_corpus", root / f"eval-{cfg.eval_corpus_size}-seed{cfg.eval_corpus_seed}",
                         cfg.eval_corpus_size, cfg.eval_corpus_seed, "eval")
    common = dict(experiment=cfg.experiment, seed=seed, corpus=train_corpus, runs_dir=str(root / "runs"),
                  tracking_uri=tracking_uri)

    def train(key: str, recipe: Recipe, *upstream) -> str:
        inputs = recipe_inputs(recipe, root, *upstream)
        if not state.current(f"models/{key}", inputs):
            state.record(f"models/{key}", timed(f"train/{key}", lambda: run_training(recipe))["registered"], inputs)
        return state["models"][key]

    # 2. the text LM, exported as an HF checkpoint
    text_lm = adapt_recipe(cfg.text_lm, run_name=f"{cfg.name}-text-lm-s{seed}", steps=cfg.text_lm_steps, **common)
    text_lm_uri = train("text-lm", text_lm)
    text_lm_dir = root / f"text-lm-seed{seed}"
    if not (state.current("exports/text-lm", text_lm_uri) and text_lm_dir.is_dir()):
        shutil.rmtree(text_lm_dir, ignore_errors=True)
        export_text_lm(text_lm_uri, tracking_uri, text_lm_dir)
        state.record("exports/text-lm", str(text_lm_dir), text_lm_uri)
    # 3. the encoder, pretrained with CTC
    encoder_dir = root / f"encoder-seed{seed}"
    encoder_inputs = step_inputs({"steps": cfg.encoder_steps, "lr": cfg.encoder_lr, "corpus": train_corpus}, root,
                                 text_lm_uri)
    if not (state.current("encoder", encoder_inputs) and encoder_dir.is_dir()):
        shutil.rmtree(encoder_dir, ignore_errors=True)
        state.record("encoder", timed("encoder", lambda: pretrain_encoder_logged(
            cfg, text_lm, train_corpus, eval_corpus, text_lm_dir, encoder_dir, seed, tracking_uri)), encoder_inputs)
    # 4. the speech recipes, all from them
    for label, path in cfg.recipes.items():
        train(label, adapt_recipe(path, run_name=f"{cfg.name}-{label}-s{seed}", steps=cfg.speech_steps,
                                  lm_pretrained=str(text_lm_dir), encoder_pretrained=str(encoder_dir), **common),
              text_lm_uri, state["inputs"]["encoder"])
    # 5. evaluation
    suite = load_suite(str(REPO / cfg.suite))
    suite.uris = [eval_corpus]
    evaluate_models(state, ["text-lm", *cfg.recipes], suite, root, tracking_uri, cfg.experiment)
    # 6. the table, chart and claims
    client = client_for(tracking_uri)
    labels = ["text-lm", *cfg.recipes]
    runs = [client.get_run(state["evaluated"][label]) for label in labels]
    metrics = [f"eval/{suite.name}/{m}" for m in cfg.metrics]
    seed_out = out / f"seed-{seed}"
    table, comparison_run = compare_runs(tracking_uri, runs, seed_out, metrics=metrics, names=labels,
                                         tags={"vtb.ablation": cfg.name, "vtb.seed": str(seed)})
    # this suite's tasks and content check only: a run found again by its name may hold metrics of an earlier suite
    current = tuple(f"eval/{suite.name}/{t.name}/" for t in suite.tasks) + (f"eval/{suite.name}/speech/",)
    rows = {label: {k: v for k, v in r.data.metrics.items() if k.startswith(current)} for label, r in zip(labels, runs)}
    result = {
        "ablation": cfg.name, "seed": seed, "command": command, "models": state["models"],
        "encoder_ctc": state.get("encoder"), "table_markdown": table, "metrics": rows,
        "claims": check_claims(rows, suite.name, cfg.roles, spoken_instruction_matches(
            client, state["evaluated"], suite.name, [cfg.roles[r] for r in ("joint", "speech_only")
                                                     if r in cfg.roles])),
        "seconds": round(time.time() - t0, 1), "timings_s": timings,
        "steps_seconds_total": round(sum(timings.values()), 1), "memory": memory.stop(),
        "comparison_run": comparison_run, "cpus": os.cpu_count(),
    }
    (seed_out / "result.json").write_text(json.dumps(result, indent=1))
    client.log_dict(comparison_run, result, "result.json")
    return result
