"""The driver side of a training run on Ray Train: everything between a validated recipe and a registered model.

1. validate the recipe's data before any worker starts; resolve the MLflow server; refuse a run folder that holds
   another recipe's checkpoints;
2. find or create the MLflow run of this run name and recipe (the same run across restarts and resubmissions),
   with the recipe as params; build the offline tokenizer when the LM names none;
3. per stage: a `TorchTrainer` running `sft.train_loop_per_worker`; Ray Train restarts failed workers from the
   last checkpoint (`FailureConfig`); the next stage starts from this one's weights;
4. the promotion gate (jobs/training/promotion.py) on the logged model; register it, with the recipe's alias only
   when every gate passed;
5. end the MLflow run as FINISHED, or FAILED / KILLED (stopped) when it did not get there.

The caller connects to Ray (`ray.init`) first: where the cluster is, is the entrypoint's business.

Why each rank reads its own shards instead of `get_dataset_shard`: Ray Data's `streaming_split` hands rows to
whichever rank asks first, so no rank knows which rows it will get after a restart and an epoch cannot resume
mid-way (ray #37633); it also cannot reshuffle shard order per epoch. Here every rank plans its own share of each
epoch's seeded shard order (`plan_reads`) and streams it through Ray Data (one read task per shard, ordered), so a
checkpoint's stream states say exactly what was consumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jobs.common.console import WORKER_ENV
from jobs.recipe import Recipe, RecipeError, check_data, check_model, parse_recipe
from tracking.client import client_for, resolve_tracking_uri
from tracking.lineage import log_lineage
from tracking.logs import log_metrics, log_params
from tracking.registry import register_run_model
from tracking.runs import RECIPE_TAG, end_status, find_or_create_run, resume_run

# The environment a worker needs from the driver's (object storage and MLflow credentials, Ray's auth mode, and the
# network interfaces the collectives bind: gloo, which takes the host-side collectives, binds to whatever the host
# name resolves to unless told, and a host name mapped to 127.0.1.1 (Debian's default) hangs across nodes).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE", "GLOO_SOCKET_IFNAME",
                 "NCCL_SOCKET_IFNAME")


def forwarded_worker_env(env: dict, tracking_uri: str) -> dict[str, str]:
    """The environment every training worker (and the promotion gate's tasks) runs with: `FORWARDED_ENV` from the
    driver's `env`, the console settings, and the run's MLflow server."""
    return {k: env[k] for k in FORWARDED_ENV if k in env} | WORKER_ENV | {"MLFLOW_TRACKING_URI": tracking_uri}


def flat_params(recipe: Recipe) -> dict[str, str]:
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = obj if isinstance(obj, str) else json.dumps(obj)

    walk("", recipe.model_dump(mode="json"))
    return out


def mlflow_run_for(recipe: Recipe, tracking_uri: str, data_summary: dict) -> str:
    """The MLflow run of this run name and recipe: found by tags (a resubmission, set RUNNING again) or created with
    the recipe as params."""
    client = client_for(tracking_uri)
    run_id, created = find_or_create_run(client, recipe.run.experiment, recipe.run.name,
                                         identity={RECIPE_TAG: recipe.training_fingerprint()})
    if created:
        params = flat_params(recipe)
        params.update({f"data_summary.{t}.{k}": str(v) for t, d in data_summary.items() for k, v in d.items()})
        log_params(client, run_id, params)
    else:
        resume_run(client, run_id)
    return run_id


def tokenizer_files_for(recipe: Recipe) -> dict | None:
    """An offline tokenizer trained on the corpora's text when the LM names none (tiny / random-init LMs)."""
    from jobs.training.tokenizer import corpus_tokenizer_files

    cfg = recipe.model.speechlm_config()
    if cfg.lm.tokenizer or cfg.lm.pretrained:
        return None
    uris = [uri for src in recipe.data.sources.values() for uri in src.uris]
    return corpus_tokenizer_files(uris, recipe.model.tokenizer_vocab_size, recipe.data.endpoint_url)


def ray_storage(path: str, endpoint_url: str | None):
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are, s3:// through pyarrow with the
    configured endpoint (MinIO, moto, ...).

    The one place that is not `data_ops.storage` (boto3): Ray Train writes and reads checkpoints itself, through a
    `pyarrow.fs.FileSystem` (RunConfig.storage_filesystem), so this hands it one for the same endpoint."""
    if not path.startswith("s3://"):
        return str(Path(path).expanduser().resolve()), None
    import pyarrow.fs

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return path, None
    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return path[len("s3://"):], fs


def promotion_verdict(recipe: Recipe, tokenizer_files: dict | None, tracking_uri: str, run_id: str, start_from,
                      worker_env: dict):
    """The promotion gate on the run's logged model, measured by one Ray task with a training worker's resources
    (its GPU included); `Verdict(enabled=False)` when the recipe's gate is off."""
    import ray

    from jobs.training.promotion import Verdict, decide, measure

    enabled = recipe.promote.enabled
    if enabled is None:
        enabled = recipe.first_speech_stage() is not None
    if not enabled:
        return Verdict((), "", enabled=False)
    task = ray.remote(measure).options(
        num_cpus=recipe.train.cpus_per_worker, num_gpus=1 if recipe.train.use_gpu else 0,
        resources=recipe.train.resources_per_worker or None, runtime_env={"env_vars": worker_env}, max_retries=1)
    try:
        measures = ray.get(task.remote(recipe, tokenizer_files, f"runs:/{run_id}/model", tracking_uri, start_from))
    except Exception as e:  # noqa: BLE001 - the trained model is kept (registered, not promoted), the error named
        return Verdict((), "", error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:500]}")
    log_metrics(client_for(tracking_uri), run_id, {f"promote/{k}": v for k, v in measures.items()
                                                    if isinstance(v, float)})
    return decide(measures, recipe.promote)


def run_folder_name(recipe: Recipe, stage) -> str:
    """Ray Train's run folder of one stage under storage_path: the run name, plus the stage's in a staged recipe."""
    return recipe.run.name if len(recipe.stage_list()) == 1 else f"{recipe.run.name}-{stage.name}"


def check_resumable(recipe: Recipe, storage_path: str, fs) -> None:
    """Refuse at once, before any MLflow run or worker, to continue a run folder another recipe wrote. The workers
    check again as they resume (the guarantee); this early look spares the user Ray Train's retries of a failure
    that cannot pass, and a worker's traceback."""
    from jobs.training.checkpoint import check_same_recipe, latest_train_state

    fingerprint = recipe.training_fingerprint()
    for stage in recipe.stage_list():
        found = latest_train_state(f"{storage_path}/{run_folder_name(recipe, stage)}", fs)
        if found:
            check_same_recipe(found[1], fingerprint, found[0])


def absolute_paths(recipe: Recipe) -> Recipe:
    """Local corpus, storage and checkpoint paths made absolute (workers run in other directories)."""
    def fix(p: str) -> str:
        return p if "://" in p else str(Path(p).expanduser().resolve())

    obj = recipe.model_dump(mode="json")
    obj["run"]["storage_path"] = fix(obj["run"]["storage_path"])
    for key in ("lm_pretrained", "encoder_pretrained"):  # local checkpoints; hub ids stay as they are
        if obj["model"].get(key) and Path(obj["model"][key]).expanduser().exists():
            obj["model"][key] = fix(obj["model"][key])
    for src in obj["data"]["sources"].values():
        src["uris"] = [fix(u) for u in src["uris"]]
    if obj["promote"].get("eval_uris"):
        obj["promote"]["eval_uris"] = [fix(u) for u in obj["promote"]["eval_uris"]]
    return parse_recipe(obj)


def check_cluster_fits(recipe: Recipe) -> None:
    import ray

    need = recipe.train.num_workers * recipe.train.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    # Ray Data's read tasks need CPU too: a fixed cluster that fits the workers exactly would hang, not fail. (A
    # cluster with fewer CPUs than the workers need is left alone: an autoscaler adds nodes, or Ray Train waits.)
    if need <= have < need + 0.5:
        raise RecipeError(f"the Ray cluster has {have:g} CPUs and the recipe's {recipe.train.num_workers} workers take "
                          f"{need:g}, leaving none for the Ray Data tasks that read the shards; use fewer workers or "
                          "cpus_per_worker, or a larger cluster (the local stack: --ray-num-cpus)")


def local_paths(recipe: Recipe) -> list[str]:
    """The recipe's local files and folders that every worker reads: corpora and pretrained checkpoints named by a
    path (hub ids and s3:// are not local)."""
    paths = [u for src in recipe.data.sources.values() for u in src.uris if "://" not in u]
    paths += [u for u in recipe.promote.eval_uris or [] if "://" not in u]
    cfg = recipe.model.speechlm_config()
    paths += [p for p in (cfg.lm.pretrained, cfg.lm.tokenizer, cfg.encoder.pretrained) if p and Path(p).exists()]
    return sorted(set(paths))


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


def run_training(recipe: Recipe, *, env: dict | None = None, sample_log_dir: str | None = None, log=print,
                 entrypoint: str = "python -m jobs.train") -> dict:
    """Train `recipe` on the connected Ray cluster. `env`: the driver's environment (the MLflow server when the
    recipe names none, storage credentials forwarded to the workers); `entrypoint`: the command the run's source
    tag names. Returns run id, tracking URI, registered model URI, the gate's verdict and the last checkpoint's
    path. The MLflow run ends FINISHED, or FAILED / KILLED when an error or a stop (Ctrl-C, SIGTERM) ends it first."""
    env = dict(os.environ if env is None else env)
    recipe = absolute_paths(recipe)
    check_model(recipe)
    data_summary = check_data(recipe)
    tracking_uri = resolve_tracking_uri(recipe.run.tracking_uri, env)
    log(f"[train] recipe OK; data: {json.dumps(data_summary)}")
    storage_path, fs = ray_storage(recipe.run.storage_path, recipe.data.endpoint_url)
    check_resumable(recipe, storage_path, fs)
    run_id = mlflow_run_for(recipe, tracking_uri, data_summary)
    error: BaseException | None = None
    try:
        try:  # this attempt's code, data and recipe; a failure to record them is reported, not fatal
            log_lineage(client_for(tracking_uri), run_id, recipe, entrypoint)
        except Exception as e:  # noqa: BLE001
            log(f"[train] WARNING: the run's lineage (source version, dataset inputs, recipe) was not recorded: {e}")
        return _train_and_register(recipe, env, tracking_uri, run_id, storage_path, fs, sample_log_dir, log)
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            client_for(tracking_uri).set_terminated(run_id, end_status(error))
        except Exception as e:  # noqa: BLE001 - the run's own error, if any, is the one to report
            log(f"[train] could not mark the MLflow run {run_id} {end_status(error)}: {e}")


def _train_and_register(recipe: Recipe, env: dict, tracking_uri: str, run_id: str, storage_path: str, fs,
                        sample_log_dir: str | None, log) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.distributed import process_group_backend
    from jobs.training.sft import WorkerJob, train_loop_per_worker

    tokenizer_files = tokenizer_files_for(recipe)
    check_cluster_fits(recipe)
    check_paths_on_every_node(local_paths(recipe), log)
    worker_env = forwarded_worker_env(env, tracking_uri)
    stages = recipe.stage_list()
    init_from, offset, result, checkpoints = None, 0, None, []
    for i, stage in enumerate(stages):
        job = WorkerJob(recipe, stage, tokenizer_files, tracking_uri, run_id, init_from=init_from,
                        final=i == len(stages) - 1, step_offset=offset, sample_log_dir=sample_log_dir)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"job": job},
            torch_config=TorchConfig(backend=process_group_backend(recipe.train.use_gpu)),
            scaling_config=ScalingConfig(num_workers=recipe.train.num_workers, use_gpu=recipe.train.use_gpu,
                                         resources_per_worker={"CPU": recipe.train.cpus_per_worker,
                                                               **recipe.train.resources_per_worker}),
            run_config=RunConfig(
                name=run_folder_name(recipe, stage),
                storage_path=storage_path, storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=recipe.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints),
                worker_runtime_env={"env_vars": worker_env},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        offset += stage.max_steps
        checkpoints.append(result.checkpoint)
        if i < len(stages) - 1:
            # the next stage starts from this one's weights: the checkpoint itself (under storage_path), which
            # each worker copies to its own node; a copy on the driver would not be there on another node
            init_from = result.checkpoint
    first_speech = recipe.first_speech_stage()
    start_from = checkpoints[first_speech - 1] if first_speech else None
    verdict = promotion_verdict(recipe, tokenizer_files, tracking_uri, run_id, start_from, worker_env)
    # the gate's verdict tags the run and the version; the recipe's alias only when every gate passed (an alias
    # that serving follows keeps pointing at the last version that passed)
    registered = register_run_model(client_for(tracking_uri), run_id, recipe.run.registered_model,
                                    run_name=recipe.run.name, tags=verdict.tags(),
                                    alias=recipe.run.alias if verdict.passed else None)
    if verdict.enabled:
        where = (f"{registered} {'with' if verdict.passed else 'WITHOUT'} the alias @{recipe.run.alias}"
                 if registered else "no registered_model")
        log(f"[train] promotion gate {verdict.summary()}; {where}")
    return {"run_id": run_id, "tracking_uri": tracking_uri, "registered": registered, "promoted": verdict.passed,
            "gate": verdict.tags(), "checkpoint": result.checkpoint.path if result and result.checkpoint else None}
