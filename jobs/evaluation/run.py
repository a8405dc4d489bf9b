"""Evaluation of a trained SpeechLM on a suite: Ray Data batch inference, scoring, the content check, and logging to
MLflow (what `python -m jobs.evaluate` runs, and the ablation's evaluation steps).

Every task's rows go through one pool of actors holding the model on the serving engine (vLLM, `models.engine`:
what is evaluated is what is served; loaded once per actor, not per task); each conversation is cut before its last
assistant turn and answered greedily (the reference is that last assistant turn). The content check (on the trained
PyTorch model, as the promotion gate measures it) runs meanwhile as a Ray task. Scores: ASR WER per language, AST
BLEU per direction, exact match for text tasks and spoken instructions, the Appendix B judge when one is
configured, and the reference answers' loss (the engine's prompt log-probabilities). Metrics go to the model's
training run (found from the registry), or to a new run in an experiment for a local model folder, with a per-sample
table `eval/<suite>/samples.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from pathlib import Path

from jobs.evaluation.suite import EvalTask, Suite


def transcription_request(conv, lang: str):
    """A conversation whose last user turn holds audio -> (that audio asked to be transcribed with the training ASR
    instruction, what the audio says: "" when the audio has no transcript, which scoring counts as `no_reference`)."""
    from data_ops.importers import asr_instruction
    from models.conversation import AudioPart, Conversation, TextPart, Turn

    user = [t for t in conv.turns if t.role == "user"][-1]
    audio = [p for p in user.parts if isinstance(p, AudioPart)]
    # [audio, instruction]: the order of the training ASR conversations (data_ops.importers.asr_conversation)
    return (Conversation([Turn("user", [*audio, TextPart(asr_instruction(lang))])]),
            " ".join(p.transcript.strip() for p in audio) if audio and all(p.transcript for p in audio) else "")


def load_for_inference(model_uri: str, tracking_uri: str | None, precision: str) -> "EngineModel":
    """The model on the serving engine (`models.engine`), on this Ray worker's device (a GPU when it was given
    one), in `precision`'s dtype there: what is evaluated is what is served."""
    from jobs.common.console import quiet_console

    quiet_console(os.environ)  # a Ray worker: no download progress bars in the job log
    return EngineModel(model_uri, tracking_uri, precision)


class EngineModel:
    """One saved model on its own vLLM engine, used synchronously: greedy answers and teacher-forced answer losses
    of conversations, each call one batch in the engine."""

    # an evaluation actor holds one CPU (`predict`): the engine gets that thread and a KV cache sized for batches
    SETTINGS = {"kv_cache_gib": 1.0, "cpu_threads": 1, "max_num_seqs": 32}

    def __init__(self, model_uri: str, tracking_uri: str | None, precision: str):
        from models.precision import inference_dtype, resolve_device
        from models.engine import BlockingRunner, EngineSettings, EngineStore
        from tracking.models import model_resolver

        device = resolve_device("auto")
        self.dtype = inference_dtype(device, precision)
        self.store = EngineStore(EngineSettings(**self.SETTINGS), model_resolver(tracking_uri), str(device), self.dtype)
        self.run = BlockingRunner()
        self.served = self.store.load(model_uri)

    def generate(self, conversations, max_new_tokens: int) -> list[str]:
        return self.run(self.served.answers(conversations, max_new_tokens))

    def answer_token_losses(self, conversations) -> list[tuple[float, int]]:
        return self.run(self.served.answer_losses(list(conversations)))



class Predictor:
    """Ray Data actor: rows of the Shar datasource -> {id, prediction, reference, prompt, context, langs}.
    Rows of the tasks named in `transcribe_tasks` are asked for a transcript of their audio instead."""

    def __init__(self, model_uri: str, tracking_uri: str | None, max_new_tokens: int,
                 transcribe_tasks: tuple[str, ...] = (), precision: str = "auto"):
        self.model = load_for_inference(model_uri, tracking_uri, precision)
        self.dtype = str(self.model.dtype).removeprefix("torch.")  # reported per row
        self.max_new_tokens = max_new_tokens
        self.transcribe_tasks = set(transcribe_tasks)

    def __call__(self, batch: dict) -> dict:
        from data_ops.shar_datasource import row_to_conversation
        from models.conversation import AudioPart, Conversation, TextPart, Turn

        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        prompts, refs, questions, contexts, full, lasts = [], [], [], [], [], []
        for row in rows:
            conv = row_to_conversation(row)
            if row["eval_task"] in self.transcribe_tasks:
                request, transcript = transcription_request(conv, json.loads(row["langs"])[0])
                conv = Conversation(request.turns + [Turn.text("assistant", transcript)])
            last = max(i for i, t in enumerate(conv.turns) if t.role == "assistant")
            full.append(conv)
            lasts.append(last)
            prompt = Conversation(conv.turns[:last])
            prompts.append(prompt)
            refs.append(conv.turns[last].text_only)
            user = prompt.turns[-1]
            questions.append(" ".join(p.text for p in user.parts if isinstance(p, TextPart)))
            contexts.append(" ".join(p.transcript or "" for p in user.parts if isinstance(p, AudioPart)))
        predictions = self.model.generate(prompts, max_new_tokens=self.max_new_tokens)
        # the reference answers' loss (teacher-forced, every assistant turn): moves before exact match does
        losses = self.model.answer_token_losses([Conversation(c.turns[:i + 1]) for c, i in zip(full, lasts)])
        return {"id": [r["id"] for r in rows], "eval_task": [r["eval_task"] for r in rows],
                "langs": [r["langs"] for r in rows], "prediction": predictions,
                "reference": refs, "question": questions, "context": contexts,
                "loss_sum": [s for s, _ in losses], "loss_tokens": [n for _, n in losses],
                "dtype": [self.dtype] * len(rows)}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the model runs: `actors` predictor actors, each with `gpus_per_actor` GPUs (None: one GPU each when
    the cluster has GPUs, else none; on a GPU cluster a CPU-only actor would never get a GPU), its weights in
    `precision` (`models.precision.inference_dtype`: auto is bf16 on GPUs that have it, fp32 on CPU)."""

    actors: int = 1
    gpus_per_actor: float | None = None
    precision: str = "auto"

    def gpus(self) -> float:
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def predict(suite: Suite, model_uri: str, tracking_uri: str | None,
            placement: Placement = Placement()) -> dict[str, list[dict]]:
    """Task name -> its rows with predictions, sorted by id. Every task's rows, tagged with the task's name, go
    through one actor pool: a model is loaded once per actor for the whole suite."""
    import pyarrow as pa
    import ray.data

    from data_ops.shar_datasource import is_error_row, shar_dataset

    tagged = []
    for task in suite.tasks:
        ds = shar_dataset(task.uris or suite.uris, task.data_type, endpoint_url=suite.endpoint_url)
        ds = ds.filter(lambda r, want=task.task: not is_error_row(r) and (want is None or r["task"] == want))
        if task.limit:
            ds = ds.limit(task.limit)
        tagged.append(ds.add_column("eval_task", lambda b, name=task.name: pa.array([name] * b.num_rows),
                                    batch_format="pyarrow"))
    ds = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    out = ds.map_batches(Predictor, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                                           "max_new_tokens": suite.max_new_tokens,
                                                           "transcribe_tasks": tuple(
                                                               t.name for t in suite.tasks
                                                               if t.prompt == "transcribe"),
                                                           "precision": placement.precision},
                         batch_size=suite.batch_size, compute=ray.data.ActorPoolStrategy(size=placement.actors),
                         num_cpus=1, num_gpus=placement.gpus())
    by_task: dict[str, list[dict]] = {task.name: [] for task in suite.tasks}
    for row in out.iter_rows():
        by_task[row["eval_task"]].append(row)
    return {name: sorted(rows, key=lambda r: r["id"]) for name, rows in by_task.items()}


def score(suite: Suite, task: EvalTask, rows: list[dict]) -> dict[str, float]:
    from data_ops import scoring
    from data_ops.llm_client import ChatEndpoint

    metrics: dict[str, float] = {"samples": float(len(rows))}
    if not rows:
        return metrics
    refs, hyps = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    if task.kind == "asr":
        by_lang = defaultdict(list)
        scored = [r for r in rows if r["reference"].strip()]
        if len(scored) < len(rows):  # nothing to score them against (no transcript): counted, not guessed
            metrics["no_reference"] = float(len(rows) - len(scored))
        for r in scored:
            by_lang[json.loads(r["langs"])[0]].append(r)
        for lang, rs in sorted(by_lang.items()):
            metrics[f"wer_{lang}"] = scoring.wer([r["reference"] for r in rs], [r["prediction"] for r in rs], lang)
        if by_lang:
            metrics["wer"] = float(sum(metrics[f"wer_{lang}"] for lang in by_lang) / len(by_lang))
    elif task.kind == "ast":
        by_dir = defaultdict(list)
        for r in rows:
            by_dir["-".join(json.loads(r["langs"]))].append(r)
        for direction, rs in sorted(by_dir.items()):
            metrics[f"bleu_{direction}"] = scoring.bleu([r["reference"] for r in rs], [r["prediction"] for r in rs])
        metrics["bleu"] = float(sum(metrics[f"bleu_{d}"] for d in by_dir) / len(by_dir))
    else:
        metrics["exact_match"] = scoring.exact_match(refs, hyps)
    if task.kind in ("sqa", "spoken_instruction"):
        if suite.judge is None:
            metrics["judge_unscored"] = float(len(rows))  # no judge configured: reported, not faked
        else:
            endpoint = ChatEndpoint(base_url=suite.judge.base_url, model=suite.judge.model,
                                    api_key_env=suite.judge.api_key_env, temperature=0.0)
            key = os.environ.get(suite.judge.api_key_env) if suite.judge.api_key_env else None
            result = scoring.judge(endpoint, key, [
                {"question": r["question"] or "(the question is spoken)", "context": r["context"],
                 "reference": r["reference"], "answer": r["prediction"]} for r in rows])
            for r, s in zip(rows, result.scores):
                r["judge"] = s
            metrics["judge_unscored"] = float(result.unscored)
            if result.mean is not None:
                metrics["judge_score"] = result.mean
    # mean cross-entropy per reference answer token (teacher-forced): a continuous measure of the same skill
    metrics["answer_loss"] = sum(r["loss_sum"] for r in rows) / max(1, sum(r["loss_tokens"] for r in rows))
    return metrics


def _content_check_task(suite: Suite, model_uri: str, tracking_uri: str | None, precision: str) -> dict[str, float]:
    """The content check on the trained PyTorch model, as the promotion gate measures it: a property of the weights
    (does the model read its audio), not of the engine; it needs no engine of its own beside the predictors'."""
    from jobs.common.console import quiet_console
    from jobs.common.content import content_probe
    from models.content_check import content_gap
    from models.precision import inference_dtype, resolve_device
    from tracking.models import load_speechlm

    convs = content_probe(suite.uris, suite.endpoint_url, size=suite.content_check)
    if not convs:
        return {}
    quiet_console(os.environ)  # a Ray worker: no download progress bars in the job log
    device = resolve_device("auto")
    model = load_speechlm(model_uri, tracking_uri=tracking_uri, device=device, dtype=inference_dtype(device, precision))
    return content_gap(model, convs).metrics()


def content_check(suite: Suite, model_uri: str, tracking_uri: str | None, placement: Placement = Placement()):
    """The content check as a Ray task (it loads the model where the cluster has room, not in the driver); returns
    its ObjectRef (`ray.get` gives the metrics) so that it runs while the tasks are predicted."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=placement.gpus())(_content_check_task)
    return task.remote(suite, model_uri, tracking_uri, placement.precision)


def evaluate_model(model_uri: str, suite: Suite, tracking_uri: str, experiment: str = "vtblender-eval",
                   placement: Placement = Placement()) -> dict:
    """Run every task of `suite` on the model and log metrics + per-sample table to MLflow: to the model's training
    run (registry or runs:/ URIs), else to a new run in `experiment`. Needs a connected Ray (`ray.init`, the
    caller's). Returns {"run_id", "metrics", "samples", "seconds"}; raises ModelNotFound / ManifestError."""
    from models.saved import is_local_model
    from tracking.client import client_for
    from tracking.experiments import experiment_id
    from tracking.logs import log_metrics
    from tracking.models import resolve_model_dir
    from tracking.registry import training_run_of

    model_dir = resolve_model_dir(model_uri, tracking_uri)  # fail before any worker if the model is not there
    if is_local_model(model_uri):  # the actors run in another working directory: a relative folder is lost there
        model_uri = str(model_dir.resolve())
    run_id = training_run_of(client_for(tracking_uri), model_uri)
    t0 = time.time()
    all_metrics: dict[str, float] = {}
    samples: dict[str, list] = defaultdict(list)
    gap_ref = content_check(suite, model_uri, tracking_uri, placement) if suite.content_check else None
    predicted = predict(suite, model_uri, tracking_uri, placement)
    dtype = ", ".join(sorted({r["dtype"] for rows in predicted.values() for r in rows})) or "n/a"
    for task in suite.tasks:
        rows = predicted[task.name]
        metrics = score(suite, task, rows)
        print(f"[eval] {suite.name}/{task.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
              flush=True)
        all_metrics.update({f"eval/{suite.name}/{task.name}/{k}": v for k, v in metrics.items()})
        for r in rows:
            for key in ("id", "prediction", "reference", "question", "context"):
                samples[key].append(r[key])
            samples["task"].append(task.name)
            samples["judge"].append(r.get("judge"))
    if gap_ref is not None:
        import ray

        gap = ray.get(gap_ref)
        if gap:
            print(f"[eval] {suite.name}/content check: gap {gap['speech/content_gap']:.3f} nats/token with another "
                  f"utterance of the same length, {gap['speech/content_gap_reversed']:.3f} time-reversed", flush=True)
        all_metrics.update({f"eval/{suite.name}/{k}": v for k, v in gap.items()})
    client = client_for(tracking_uri)
    if run_id is None:
        run_id = client.create_run(experiment_id(client, experiment), run_name=f"eval-{Path(model_uri).name}",
                                   tags={"vtb.model_uri": model_uri}).info.run_id
        client.set_terminated(run_id)
    log_metrics(client, run_id, all_metrics)
    client.set_tag(run_id, f"vtb.eval.{suite.name}.model_uri", model_uri)
    client.set_tag(run_id, f"vtb.eval.{suite.name}.dtype", dtype)
    client.log_table(run_id, data=dict(samples), artifact_file=f"eval/{suite.name}/samples.json")
    client.log_dict(run_id, suite.model_dump(mode="json"), f"eval/{suite.name}/suite.json")
    return {"run_id": run_id, "metrics": all_metrics, "samples": len(samples["id"]), "dtype": dtype,
            "seconds": time.time() - t0}


def logged_samples(client, run_id: str, suite_name: str, task: str) -> list[dict]:
    """The rows of `task` in the per-sample table `evaluate_model` logged to `run_id` for suite `suite_name`
    (id, prediction, reference, ...), sorted by id: what per-sample statistics are computed from."""
    from tracking.artifacts import read_json

    table = read_json(client, run_id, f"eval/{suite_name}/samples.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    return sorted((r for r in rows if r["task"] == task), key=lambda r: r["id"])
