"""The ablation miniature: the paper's Table 4 at a size a 2-core CPU machine runs, with the product's own jobs.

    ray job submit --working-dir . -- python -m jobs.ablation --config jobs/ablations/table4_mini.yaml \
        --root $PWD/.stack/ablation --out $PWD/docs/ablation --tracking-uri $MLFLOW_TRACKING_URI --seed 0
    make ablation SEED=0            # the same, with the local stack started first (and left up for the MLflow UI)

One seed, top to bottom:
1. corpora (`data_ops.demo_corpus`): the training corpus (text SFT tasks; ASR/AST, speech QA and mixed-modal
   SFT spoken by espeak-ng in En/De/Es/Fr with the training voices), drawn from the seed; the evaluation corpus
   from a fixed seed (the same for every run) with other utterances, voices held out of training and the text
   tasks fully spoken (spoken instructions, which no recipe trains on);
2. the text LM (`text_lm` recipe, `jobs.train`): a random-init LM trained on the text SFT tasks alone, exported
   as a Hugging Face checkpoint (model + tokenizer) — the "Gemma after text SFT" the paper starts from;
3. the speech encoder, pretrained with CTC on the training corpus's ASR cuts (`jobs.pretrain_encoder`) — the
   stand-in for the paper's pretrained Canary encoder;
4. each speech recipe (joint SFT with LoRA, B1, B2, B3, SpeechCombine), all from those two checkpoints with the
   same number of steps and the same seed, via `jobs.train` (registered in MLflow);
5. every model, the text LM included, through `jobs.evaluate` (metrics logged to its training run);
6. `jobs.compare`: the table and chart, in MLflow (a comparison run) and in `--out/seed-<seed>/`, with
   `result.json` (metrics, the paper's claims checked, run time, peak memory, the command).

Each finished step is recorded in `--root/state-seed<seed>.json` with a fingerprint of its inputs; running the
command again skips what is done (a crash costs at most the step it was in, and within a training step no more
than its last checkpoint) and does again a step whose inputs changed (an edited config or recipe: more steps,
other ratios; an upstream step done again), with every step after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

from typing import Literal

from pydantic import Field, model_validator

from jobs import config_files
from jobs.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from models.config import StrictModel

REPO = Path(__file__).resolve().parents[1]


def in_repo(path: str | Path) -> Path:
    """A config's relative paths are relative to the repository (the job's working directory may be elsewhere)."""
    return REPO / path if not Path(path).is_absolute() else Path(path)


class AblationConfig(StrictModel):
    @model_validator(mode="after")
    def _roles_name_recipes(self) -> "AblationConfig":
        unknown = {role: label for role, label in self.roles.items() if label not in self.recipes}
        if unknown:  # a renamed recipe key must not turn its checks into "not measured" unnoticed
            raise ValueError(f"roles {unknown} name no recipe; the recipes are {list(self.recipes)}")
        return self

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str
    corpus_size: str = "ablation"
    eval_corpus_size: str = "ablation-eval"
    eval_corpus_seed: int = 1000
    """One evaluation corpus for every seed, so runs with different seeds are scored on the same samples."""
    text_lm: str
    """The text-only recipe (jobs/recipes/mini/text_lm.yaml)."""
    text_lm_steps: int | None = Field(None, ge=1)
    encoder_steps: int = Field(800, ge=1)
    """CTC pretraining steps of the encoder (batch 16)."""
    encoder_lr: float = Field(1e-3, gt=0)
    """Peak lr of the CTC pretraining (docs/ablation.md has how it and the seed decide when CTC leaves its
    plateau)."""
    speech_steps: int = Field(ge=1)
    """Steps of every speech recipe (a multi-stage recipe's stages are scaled to sum to this)."""
    recipes: dict[str, str] = Field(min_length=1)
    """Label -> recipe YAML; table rows in this order after the text LM."""
    roles: dict[Literal["joint", "speech_only", "frozen_lm"], str] = Field(default_factory=dict)
    """Which recipe label plays which part in the paper's checks (`check_claims`): joint SFT, speech-only SFT (B1),
    the frozen LM (B2). A check whose role is not given is reported as not run by this config."""
    suite: str
    metrics: list[str] = Field(min_length=1)
    """Table columns (metric names under eval/<suite>/)."""


def load_config(path: str | Path) -> AblationConfig:
    cfg = config_files.load_config(path, AblationConfig, "ablation config", RecipeError)
    for recipe in [cfg.text_lm, *cfg.recipes.values()]:
        load_recipe(in_repo(recipe))  # every recipe valid up front
    return cfg


def adapt_recipe(path: str, *, run_name: str, experiment: str, seed: int, corpus: str, runs_dir: str,
                 tracking_uri: str, steps: int | None, lm_pretrained: str | None = None,
                 encoder_pretrained: str | None = None) -> Recipe:
    """The recipe as the ablation runs it: its corpus, seed, step count, text LM and encoder; nothing else."""
    raw = load_recipe(in_repo(path)).model_dump(mode="json")
    raw["run"].update(name=run_name, experiment=experiment, seed=seed, storage_path=runs_dir,
                      tracking_uri=tracking_uri)
    for src in raw["data"]["sources"].values():
        src["uris"] = [corpus]
    if lm_pretrained:
        raw["model"]["lm_pretrained"] = lm_pretrained
    if encoder_pretrained:
        raw["model"]["encoder_pretrained"] = encoder_pretrained
    if steps:
        stages = raw.get("stages") or []
        total = sum(st["max_steps"] for st in stages) if stages else raw["train"]["max_steps"]
        raw["train"]["max_steps"] = steps
        done = 0
        for i, st in enumerate(stages):  # keep the stages' proportions (B3: 87% frozen LM, 13% LoRA)
            st["max_steps"] = steps - done if i == len(stages) - 1 else max(1, round(st["max_steps"] * steps / total))
            done += st["max_steps"]
        raw["train"]["checkpoint_every"] = min(raw["train"]["checkpoint_every"], steps)
    return parse_recipe(raw, path)


def export_text_lm(model_uri: str, tracking_uri: str, out: Path) -> Path:
    """The text LM of a trained (text-only) SpeechLM as a standalone Hugging Face checkpoint with its tokenizer:
    what `lm_pretrained` expects (the same code path as a real Gemma checkpoint)."""
    from services.model_store import load_speechlm

    model = load_speechlm(model_uri, tracking_uri=tracking_uri)
    tmp = out.with_name(out.name + ".partial")
    model.lm.save_pretrained(tmp)
    model.tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # complete or absent
    return out


class PeakMemory:
    """Samples the memory in use on this machine (every process: Ray, MLflow, workers) while the run goes."""

    def __init__(self, every_s: float = 1.0):
        import psutil

        self._psutil, self.every_s = psutil, every_s
        self.baseline = self.peak = psutil.virtual_memory().used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self._psutil.virtual_memory().used)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        gib = 1024 ** 3
        return {"baseline_gib": round(self.baseline / gib, 2), "peak_gib": round(self.peak / gib, 2),
                "peak_over_baseline_gib": round((self.peak - self.baseline) / gib, 2)}


def pretrain_encoder_logged(cfg: AblationConfig, text_lm: Recipe, corpus: str, eval_corpus: str, tokenizer_dir: Path,
                            out: Path, seed: int, tracking_uri: str) -> dict:
    """jobs.pretrain_encoder on the training corpus (targets: the text LM's tokenizer), tracked as its own run."""
    from transformers import AutoTokenizer

    from jobs.training.encoder_pretraining import pretrain_encoder
    from jobs.training.tracking import client_for, create_run, log_metrics, log_params

    client = client_for(tracking_uri)
    run_id = create_run(client, cfg.experiment, f"{cfg.name}-encoder-ctc-s{seed}", tags={"vtb.ablation": cfg.name})
    log_params(client, run_id, {"steps": cfg.encoder_steps, "lr": cfg.encoder_lr, "seed": seed, "corpus": corpus})
    try:
        return pretrain_encoder(corpus, text_lm.model.speechlm_config(), AutoTokenizer.from_pretrained(tokenizer_dir),
                                out, steps=cfg.encoder_steps, lr=cfg.encoder_lr, seed=seed, eval_corpus=eval_corpus,
                                on_metrics=lambda metrics, step: log_metrics(client, run_id, metrics, step))
    finally:
        client.set_terminated(run_id)


# The content check's gap (nats per answer token, other utterance of the same length minus right audio): a model
# that reads the audio is far above the first, one that never learned to is within the second of zero.
CONTENT_GAP_CLEAR = 0.3
CONTENT_GAP_NONE = 0.1


def check_claims(rows: dict[str, dict[str, float]], suite: str, roles: dict[str, str],
                 spoken: dict[str, dict[str, bool]] | None = None) -> list[dict]:
    """The paper's Table 4 pattern as checks on the measured metrics: each says what it compares and whether the
    numbers show it. Nothing is tuned to make one hold; a check without its metrics is reported as such.

    `spoken`: label -> {sample id: exact match} on the spoken instructions. With it, the spoken-instruction checks
    carry a bootstrap 95% interval (`ci95`: of joint - B1, paired; of joint's score) and `within_noise`: whether
    the interval holds the check's boundary, i.e. whether these samples can tell at all (the paper's own gap there
    is 0.191 vs 0.181; a miniature's 100 samples move in steps of 0.01).

    `roles`: which row is joint, speech_only (B1) and frozen_lm (B2) (`AblationConfig.roles`); the text LM's row
    is "text-lm"."""
    roles = {"text_lm": "text-lm", **roles}

    def m(role: str, metric: str) -> float | None:
        return rows.get(roles.get(role, ""), {}).get(f"eval/{suite}/{metric}")

    checks = []

    def claim(text: str, a: float | None, b: float | None, holds, ci: tuple[float, float] | None = None,
              boundary: float = 0.0) -> None:
        ok = None if a is None or b is None else bool(holds(a, b))
        checks.append({"claim": text, "values": [a, b], "holds": ok})
        if ci is not None:
            checks[-1].update(ci95=[round(ci[0], 4), round(ci[1], 4)], within_noise=bool(ci[0] <= boundary <= ci[1]))

    text, wer, bleu, follows = "text/exact_match", "asr/wer", "ast/bleu", "spoken_instruction/exact_match"
    gap = "speech/content_gap"
    claim("joint SFT transcribes held-out voices: joint ASR WER <= 0.5",
          m("joint", wer), 0.5, lambda a, b: a <= b)
    claim("joint SFT's speech comes from the audio: joint ASR WER at least 0.3 below the text LM's",
          m("joint", wer), m("text_lm", wer), lambda a, b: a <= b - 0.3)
    claim("joint SFT reaches speech quality close to B1: joint ASR WER <= B1's + 0.1",
          m("joint", wer), m("speech_only", wer), lambda a, b: a <= b + 0.1)
    claim("joint SFT translates close to B1: joint AST BLEU >= B1's - 3",
          m("joint", bleu), m("speech_only", bleu), lambda a, b: a >= b - 3)
    claim("B2 (frozen LM) is worse on speech: B2 ASR WER > joint's",
          m("frozen_lm", wer), m("joint", wer), lambda a, b: a > b)
    claim("joint SFT keeps text accuracy: joint text exact match >= 90% of the text LM's",
          m("joint", text), m("text_lm", text), lambda a, b: a >= 0.9 * b)
    claim("B1 (speech-only SFT) forgets text: B1 text exact match <= 50% of the text LM's",
          m("speech_only", text), m("text_lm", text), lambda a, b: a <= 0.5 * b)
    claim("joint SFT follows spoken instructions better than B1: exact match joint > B1",
          m("joint", follows), m("speech_only", follows), lambda a, b: a > b,
          ci=_spoken_ci(spoken, roles.get("joint"), roles.get("speech_only")), boundary=0.0)
    claim("joint SFT follows spoken instructions: exact match >= 0.1",
          m("joint", follows), 0.1, lambda a, b: a >= b, ci=_spoken_ci(spoken, roles.get("joint")), boundary=0.1)
    speech_labels = [label for label in rows if label != "text-lm"]
    gaps = [rows[label].get(f"eval/{suite}/{gap}") for label in speech_labels]
    claim(f"every speech recipe reads the audio: content gap >= {CONTENT_GAP_CLEAR} nats/token "
          f"({', '.join(speech_labels)}; the smallest is shown)",
          None if any(g is None for g in gaps) else min(gaps), CONTENT_GAP_CLEAR, lambda a, b: a >= b)
    claim(f"the text LM (never trained on audio) has no content gap: |gap| < {CONTENT_GAP_NONE}",
          m("text_lm", gap), CONTENT_GAP_NONE, lambda a, b: abs(a) < b)
    return checks


def _spoken_ci(spoken: dict[str, dict[str, bool]] | None, label: str | None,
               baseline: str | None = None) -> tuple[float, float] | None:
    """Bootstrap interval of `label`'s spoken-instruction score (minus `baseline`'s, paired), or None without
    both models' samples on the same ids."""
    from data_ops.scoring import bootstrap_ci

    ids = sorted((spoken or {}).get(label or "", {}))
    if not ids or (baseline and sorted(spoken.get(baseline, {})) != ids):
        return None
    return bootstrap_ci([spoken[label][i] for i in ids], [spoken[baseline][i] for i in ids] if baseline else None)


def spoken_instruction_matches(client, evaluated: dict[str, str], suite_name: str,
                               labels: list[str]) -> dict[str, dict[str, bool]]:
    """label -> {sample id: exact match} on the suite's `spoken_instruction` task, from the samples each model's
    evaluation run logged (models without that task are left out)."""
    from data_ops.scoring import exact_matches
    from jobs.evaluation.run import logged_samples

    out = {}
    for label in labels:
        rows = logged_samples(client, evaluated[label], suite_name, "spoken_instruction") if label in evaluated else []
        if rows:
            out[label] = dict(zip((r["id"] for r in rows),
                                  exact_matches([r["reference"] for r in rows], [r["prediction"] for r in rows])))
    return out


class SeedState:
    """What one seed's run has done so far (`state-seed<N>.json` under the work folder): steps finished, their
    outputs and timings, so a rerun skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.state = json.loads(path.read_text()) if path.is_file() else {}
        self.timings = self.state.get("timings", {})

    def __getitem__(self, key: str):
        return self.state[key]

    def get(self, key: str, default=None):
        return self.state.get(key, default)

    def done(self, key: str, value) -> None:
        self.state[key] = value
        self.path.write_text(json.dumps(self.state, indent=1))

    def current(self, path: str, inputs) -> bool:
        """Is the step at `path` ("encoder", "models/joint": a key, or group/key) done from these `inputs` (its
        recipe or settings and what it was built from)? Done from other inputs (a config edited since, an upstream
        step redone), it is not: the step runs again and `record` replaces its output. Only answers; writes nothing."""
        group, _, key = path.partition("/")
        done = key in self.state.get(group, {}) if key else group in self.state
        if not done:
            return False
        if self.state.get("inputs", {}).get(path) != _fingerprint(inputs):
            print(f"[ablation] {path} was done from other inputs than the config's now: doing it again", flush=True)
            return False
        return True

    def record(self, path: str, value, inputs) -> None:
        """The step at `path` done from `inputs` (see `current`), with its output `value`."""
        group, _, key = path.partition("/")
        self.state.setdefault("inputs", {})[path] = _fingerprint(inputs)
        self.done(group, {**self.state.get(group, {}), key: value} if key else value)

    def timed(self, key: str, fn):
        """Run `fn`, record how long it took (only work that runs: a step found done keeps its first timing)."""
        start = time.time()
        value = fn()
        self.timings[key] = round(time.time() - start, 1)
        self.state["timings"] = self.timings
        return value


def _fingerprint(inputs) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def step_inputs(settings: dict, root: Path, *upstream) -> dict:
    """What a step's output depends on: its settings (paths under the work folder relative to it, so a moved
    folder is the same) and the outputs it starts from."""
    return {"settings": json.loads(json.dumps(settings).replace(str(root), "<root>")), "from": list(upstream)}


def recipe_inputs(recipe: Recipe, root: Path, *upstream) -> dict:
    settings = recipe.model_dump(mode="json")
    settings["run"] = {"seed": settings["run"]["seed"]}  # run names, storage and tracking do not change what trains
    return step_inputs(settings, root, *upstream)


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
    from mlflow.tracking import MlflowClient

    from data_ops.demo_corpus import build_demo_corpus
    from data_ops.shards import ManifestError, read_manifest
    from jobs.evaluation.compare import compare_runs
    from jobs.evaluation.suite import load_suite
    from jobs.training.ray_run import run_training

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
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
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


def summary(result: dict) -> str:
    lines = [result["table_markdown"], "Claims of the paper (Table 4), checked on these numbers:"]
    for c in result["claims"]:
        mark = {True: "holds", False: "does NOT hold", None: "not measured"}[c["holds"]]
        vals = ", ".join("–" if v is None else f"{v:.3f}" for v in c["values"])
        lines.append(f"- {mark}: {c['claim']} ({vals}){_noise_note(c)}")
    mem = result["memory"]
    lines.append(f"seed {result['seed']}: {result['seconds']:.0f} s on {result['cpus']} CPUs; peak memory in use "
                 f"{mem['peak_gib']} GiB ({mem['peak_over_baseline_gib']} GiB over the {mem['baseline_gib']} GiB "
                 "before the run)")
    return "\n".join(lines)


def _noise_note(check: dict) -> str:
    """' (95% CI lo..hi, within noise)' for a check with an interval: whether its samples can tell at all."""
    if "ci95" not in check:
        return ""
    lo, hi = check["ci95"]
    return f" (95% CI {lo:.3f}..{hi:.3f}{', within noise' if check['within_noise'] else ''})"


def seeds_table(out: Path) -> str | None:
    """Every seed's numbers side by side (`out/seed-*/result.json`), with the spread (max - min) per cell: how much
    a metric moves with the seed. Written to `out/seeds.md`; None when fewer than two seeds have run."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("seed-*/result.json"))]
    if len(results) < 2:
        return None
    seeds = [r["seed"] for r in results]
    labels = list(results[0]["models"])
    suite_metrics = [m for m in results[0]["metrics"][labels[0]] if not m.endswith(("/samples", "judge_unscored"))
                     and m.count("/") == 3 and m.split("/")[-1] in ("wer", "bleu", "exact_match", "answer_loss",
                                                                    "content_gap")]
    lines = ["| model | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | spread |",
             "| --- | --- |" + " ---: |" * (len(seeds) + 1)]
    for label in labels:
        for metric in suite_metrics:
            vals = [r["metrics"].get(label, {}).get(metric) for r in results]
            if any(v is None for v in vals):
                continue
            cells = [f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in vals]
            lines.append(f"| {label} | {metric.split('/', 2)[-1]} | " + " | ".join(cells) +
                         f" | {max(vals) - min(vals):.3f} |")
    claims = ["", "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " :---: |" * len(seeds)]
    for i, c in enumerate(results[0]["claims"]):
        marks = [{True: "holds", False: "no", None: "–"}[r["claims"][i]["holds"]] + _noise_note(r["claims"][i])
                 for r in results]
        claims.append(f"| {c['claim'].replace('|', '&#124;')} | " + " | ".join(marks) + " |")  # |gap| in a table
    text = "\n".join(lines + claims) + "\n"
    (out / "seeds.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="jobs/ablations/table4_mini.yaml")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds, run one after another")
    ap.add_argument("--root", default=".stack/ablation", help="work folder: corpora, text LM, checkpoints, state")
    ap.add_argument("--out", default="docs/ablation", help="tables, charts and result.json per seed")
    ap.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    args = ap.parse_args(argv)
    from jobs.training.console import quiet_console

    quiet_console(os.environ)
    command = "python -m jobs.ablation " + shlex.join(argv if argv is not None else sys.argv[1:])
    from jobs.training.checkpoint import CheckpointMismatch
    from jobs.training.tracking import tracking_uri_or_report

    args.tracking_uri = tracking_uri_or_report(args.tracking_uri, dict(os.environ))
    if args.tracking_uri is None:
        return 2
    try:
        cfg = load_config(in_repo(args.config))
        import ray

        from jobs.training.console import quiet_ray_data

        ray.init(log_to_driver=True)  # the cluster of RAY_ADDRESS (set by `ray job submit`), else a local one
        quiet_ray_data()
        for seed in args.seed:
            result = run_seed(cfg, seed, Path(args.root).resolve(), Path(args.out).resolve(), args.tracking_uri,
                              command)
            print(summary(result), flush=True)
        table = seeds_table(Path(args.out).resolve())
        if table:
            print(f"\nacross seeds ({Path(args.out).resolve() / 'seeds.md'}):\n{table}", flush=True)
    except (RecipeError, CheckpointMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
