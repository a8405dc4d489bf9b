"""Before launch: what is checked, and shown, of a run before any worker starts. `jobs.train --check` and
`run_training` call the same checks, on the same `RunPlan`:

- `check_model`: the checkpoints the plan names fit its model configs (read from their configs only);
- `check_data`: every corpus manifest read (once: the plan keeps them for every later reader), every listed shard
  exists and every sampled type has data;
- `describe_model` / `model_summary`: parameters per part, LoRA targets, stop tokens and a sample conversation as
  the LM's chat template renders it (built without weights: `models.skeleton`);
- the memory plan per worker (`jobs.training.memory_plan`);
- with a cluster (`run_training` only): a run folder that holds another recipe's checkpoints is refused, the
  cluster must leave CPUs for the data reads, and local paths must be on every node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_ops.shards import CorpusManifest
from jobs.recipe import RecipeError
from jobs.training.plan import RunPlan
from models.config import SpeechLMConfig


def check_model(plan: RunPlan) -> None:
    """Raises RecipeError naming every problem between the stages' model configs and the checkpoints they name
    (each distinct config checked once: stages differ in LM mode, which decides whether LoRA targets apply)."""
    from models.checkpoint_check import checkpoint_problems

    problems = list(dict.fromkeys(p for cfg, _ in plan.distinct_models() for p in checkpoint_problems(cfg)))
    if problems:
        raise RecipeError("the recipe's model cannot be built from its checkpoints:\n" +
                          "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class DataCheck:
    summary: dict[str, dict]
    """Per data type: cuts, hours, shards (and `over_max_sample_audio_s` with that cap)."""
    manifests: dict[str, CorpusManifest]
    """Each corpus's manifest by URI, read once."""


def check_data(plan: RunPlan) -> DataCheck:
    """Open every corpus manifest (each once); every listed shard must exist and every sampled type must have data.
    With `data.max_sample_audio_s`, count the cuts over it. Raises RecipeError naming every problem."""
    from data_ops.shards import ManifestError, read_manifest
    from data_ops.storage import open_storage

    data = plan.data
    problems, summary, manifests, unreadable = [], {}, {}, {}
    for uri in plan.corpus_uris:
        try:
            manifests[uri] = read_manifest(uri, data.endpoint_url)
        except ManifestError as e:
            unreadable[uri] = e
    for uri in plan.promote.eval_uris or []:
        if uri in manifests:
            continue
        try:  # the gate's held-out corpora: read here when they can be; a failure is the gate's to report
            manifests[uri] = read_manifest(uri, data.endpoint_url)
        except Exception:  # noqa: BLE001 - (unreadable, another scheme, storage down): the model is still trained
            pass
    ratios = {k: max([src.ratio] + [s.ratios.get(k, 0.0) for s in plan.stages]) for k, src in data.sources.items()}
    for dtype, src in data.sources.items():
        cuts = shards = 0
        hours = 0.0
        for uri in src.uris:
            if uri in unreadable:
                problems.append(f"  data.sources.{dtype}: {unreadable[uri]}")
                continue
            manifest = manifests[uri]
            info = manifest.types.get(dtype)
            if info is None:
                problems.append(
                    f"  data.sources.{dtype}: {uri} has no {dtype!r} shards (it has {sorted(manifest.types)})")
                continue
            storage = open_storage(uri, data.endpoint_url)
            for shard in info.shards:
                for rel in filter(None, (shard.cuts, shard.recording)):
                    if not storage.exists(rel):
                        problems.append(f"  data.sources.{dtype}: shard {storage.uri}/{rel} is listed in the "
                                        "manifest but missing")
            cuts += info.num_cuts
            hours += info.hours
            shards += len(info.shards)
        if ratios[dtype] > 0 and cuts == 0 and not any(dtype in p for p in problems):
            problems.append(f"  data.sources.{dtype}: sampled with ratio {ratios[dtype]} but has no data")
        summary[dtype] = {"cuts": cuts, "hours": round(hours, 4), "shards": shards}
        if data.max_sample_audio_s is not None and not problems:
            summary[dtype]["over_max_sample_audio_s"] = sum(
                1 for uri in src.uris for cut in _cuts(uri, dtype, plan, manifests)
                if float(cut.get("duration") or 0.0) > data.max_sample_audio_s)
    if problems:
        raise RecipeError("the recipe's data cannot be used:\n" + "\n".join(problems))
    return DataCheck(summary, manifests)


def _cuts(uri: str, dtype: str, plan: RunPlan, manifests: dict):
    """The cut manifests of one type (no audio: one pass over the cuts files, only where a cap needs counting)."""
    from data_ops.shar_datasource import iter_cut_dicts

    return iter_cut_dicts(uri, dtype, endpoint_url=plan.data.endpoint_url, manifest=manifests.get(uri))


def check_run(plan: RunPlan) -> tuple[RunPlan, dict]:
    """`run_training`'s checks before anything is created: the model, then the data. Returns the plan holding the
    corpora's manifests, and the data summary (what the MLflow run records)."""
    check_model(plan)
    data = check_data(plan)
    return plan.with_manifests(data.manifests), data.summary


def check_report(plan: RunPlan) -> str:
    """`jobs.train --check`: the checks, then the model, the data summary and the memory plan per worker."""
    from jobs.training.memory_plan import run_memory_plan

    check_model(plan)
    data = check_data(plan)
    plan = plan.with_manifests(data.manifests)
    vocab = plan.recipe.model.tokenizer_vocab_size if plan.offline_tokenizer else None
    described = [describe_model(cfg, vocab) if len(plan.stages) == 1 else
                 f"stage {', '.join(names)} (LM {cfg.lm.mode}):\n" + describe_model(cfg, vocab)
                 for cfg, names in plan.distinct_models()]
    return "\n".join([*described, json.dumps(data.summary, indent=1), run_memory_plan(plan)[1]])


def model_summary(cfg: SpeechLMConfig, vocab_size: int | None = None) -> dict:
    """What `jobs.train --check` shows of the model before training: parameters per part (built without weights from
    the configs alone), the LoRA targets found, the stop tokens, and a sample mixed-modal conversation as the LM's
    chat template renders it, the audio positions marked (None without a tokenizer)."""
    import numpy as np

    from models.conversation import AudioPart, Conversation, TextPart, Turn
    from models.skeleton import skeleton

    meta = skeleton(cfg, vocab_size=vocab_size)
    out = {"parameters": meta.parameter_counts(),
           "trainable": sum(p.numel() for p in meta.parameters() if p.requires_grad),
           "lora_targets": sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in meta.lm.named_parameters()
                                   if ".lora_A." in n}),
           "lora_layers": sum(1 for n, _ in meta.lm.named_parameters() if ".lora_A." in n and n.endswith("weight")),
           "rendered": None, "stops": []}
    source = cfg.lm.tokenizer or cfg.lm.pretrained
    if not source:
        return out
    from transformers import AutoTokenizer

    from models.processor import ConversationProcessor

    tok = AutoTokenizer.from_pretrained(source)
    processor = ConversationProcessor(tok, meta.audio_token_count, cfg.audio_placeholder, cfg.sampling_rate)
    silence = [np.zeros(int(s * cfg.sampling_rate), np.float32) for s in (2.0, 1.0)]
    sample = Conversation([
        Turn("user", [TextPart("Listen:"), AudioPart(silence[0]), TextPart("What is said?")]),
        Turn.text("assistant", "The answer."),
        Turn("user", [AudioPart(silence[1])]),
    ])
    text, _ = processor.render(sample, for_generation=True)
    for audio in silence:
        mark = f"<audio {len(audio) / cfg.sampling_rate:.1f} s = {meta.audio_token_count(len(audio))} positions>"
        text = text.replace(cfg.audio_placeholder, mark, 1)
    out["rendered"] = text
    out["stops"] = list(dict.fromkeys(tok.convert_ids_to_tokens(i) for i in [tok.eos_token_id,
                                                                            *processor.end_of_turn_ids()]
                                      if i is not None))
    return out


def describe_model(cfg: SpeechLMConfig, vocab_size: int | None = None) -> str:
    s = model_summary(cfg, vocab_size)
    c = s["parameters"]
    lines = [f"parameters: encoder {c['encoder'] / 1e6:,.1f}M, adapter {c['adapter'] / 1e6:,.1f}M, "
             f"LoRA {c['lora'] / 1e6:,.1f}M, LM {c['lm'] / 1e6:,.1f}M; total {sum(c.values()) / 1e6:,.1f}M, "
             f"trainable {s['trainable'] / 1e6:,.1f}M"]
    if s["lora_targets"]:
        lines.append(f"LoRA r={cfg.lm.lora.r} on {s['lora_layers']} linear layers: {', '.join(s['lora_targets'])}")
    if s["rendered"] is None:
        lines.append("chat template: the offline tokenizer is built from the corpora when training starts")
    else:
        lines += [f"generation stops on: {', '.join(s['stops'])}", "a sample conversation as the LM sees it:",
                  s["rendered"]]
    return "\n".join(lines)


def tokenizer_files_for(plan: RunPlan) -> dict | None:
    """An offline tokenizer trained on the corpora's text when the LM names none (tiny / random-init LMs)."""
    from jobs.training.tokenizer import corpus_tokenizer_files

    if not plan.offline_tokenizer:
        return None
    uris = [uri for src in plan.data.sources.values() for uri in src.uris]
    return corpus_tokenizer_files(uris, plan.recipe.model.tokenizer_vocab_size, plan.data.endpoint_url,
                                  plan.manifests)


def check_resumable(plan: RunPlan, storage_path: str, fs) -> None:
    """Refuse at once, before any MLflow run or worker, to continue a run folder another recipe wrote. The workers
    check again as they resume (the guarantee); this early look spares the user Ray Train's retries of a failure
    that cannot pass, and a worker's traceback."""
    from jobs.training.checkpoint import check_same_recipe, latest_train_state

    for stage in plan.stages:
        found = latest_train_state(f"{storage_path}/{stage.run_folder}", fs)
        if found:
            check_same_recipe(found[1], plan.fingerprint, found[0])


def check_cluster_fits(plan: RunPlan) -> None:
    import ray

    tr = plan.train
    need = tr.num_workers * tr.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    # Ray Data's read tasks need CPU too: a fixed cluster that fits the workers exactly would hang, not fail. (A
    # cluster with fewer CPUs than the workers need is left alone: an autoscaler adds nodes, or Ray Train waits.)
    if need <= have < need + 0.5:
        raise RecipeError(f"the Ray cluster has {have:g} CPUs and the recipe's {tr.num_workers} workers take "
                          f"{need:g}, leaving none for the Ray Data tasks that read the shards; use fewer workers or "
                          "cpus_per_worker, or a larger cluster (the local stack: --ray-num-cpus)")


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not Path(p).exists()]


def check_paths_on_every_node(paths: list[str], log=print) -> None:
    """On a cluster of several nodes, local paths must be on every node that may run a worker (a shared filesystem);
    else refuse before any worker starts, naming the paths and the nodes that lack them, instead of a worker failing
    on another node. One probe task per node (no CPU asked, so busy nodes answer too). A node that dies meanwhile
    (Ray lists a lost node as alive until its heartbeats time out) cannot run a worker either: it is named in the
    log and not waited for."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2 or not paths:
        return
    probe = ray.remote(num_cpus=0)(_missing)
    refs = {f"{n.get('NodeName') or n['NodeManagerHostname']} ({n['NodeID'][:8]})":
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes}
    lacking, unreachable = {}, []
    for node, ref in refs.items():
        try:
            missing = ray.get(ref, timeout=120)
        except ray.exceptions.RayError:  # the node died, or did not answer in time (GetTimeoutError)
            unreachable.append(node)
            continue
        if missing:
            lacking[node] = missing
    if unreachable:
        log(f"[train] nodes that did not answer the path check (lost or unreachable), not checked: {unreachable}")
    if lacking:
        raise RecipeError(
            f"the Ray cluster has {len(nodes)} nodes and local paths of the recipe are not on all of them: "
            + "; ".join(f"{node} lacks {', '.join(missing)}" for node, missing in sorted(lacking.items()))
            + ". Put them on a filesystem every node mounts, or on object storage (corpora: s3://...), or name "
            "checkpoints by hub id")
