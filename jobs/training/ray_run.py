"""The driver side of a training run on Ray Train: everything between a validated recipe and a registered model.

1. resolve the recipe once into the run's plan (`jobs.training.plan`: per-stage model configs, ratios, lrs, the
   fingerprint), which the workers get as it is; the pre-launch checks (`jobs.training.preflight`: model, data, a
   run folder that holds another recipe's checkpoints); resolve the MLflow server;
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
from jobs.recipe import Recipe
from jobs.training.plan import RunPlan, resolve
from jobs.training.preflight import (check_cluster_fits, check_paths_on_every_node, check_resumable, check_run,
                                     tokenizer_files_for)
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


def mlflow_run_for(plan: RunPlan, tracking_uri: str, data_summary: dict) -> str:
    """The MLflow run of this run name and recipe: found by tags (a resubmission, set RUNNING again) or created with
    the recipe as params."""
    client = client_for(tracking_uri)
    run_id, created = find_or_create_run(client, plan.run.experiment, plan.run.name,
                                         identity={RECIPE_TAG: plan.fingerprint})
    if created:
        params = flat_params(plan.recipe)
        params.update({f"data_summary.{t}.{k}": str(v) for t, d in data_summary.items() for k, v in d.items()})
        log_params(client, run_id, params)
    else:
        resume_run(client, run_id)
    return run_id


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


def promotion_verdict(plan: RunPlan, tokenizer_files: dict | None, tracking_uri: str, run_id: str, start_from,
                      worker_env: dict):
    """The promotion gate on the run's logged model, measured by one Ray task with a training worker's resources
    (its GPU included); `Verdict(enabled=False)` when the recipe's gate is off."""
    import ray

    from jobs.training.promotion import Verdict, decide, measure

    if not plan.gate:
        return Verdict((), "", enabled=False)
    tr = plan.train
    task = ray.remote(measure).options(
        num_cpus=tr.cpus_per_worker, num_gpus=1 if tr.use_gpu else 0,
        resources=tr.resources_per_worker or None, runtime_env={"env_vars": worker_env}, max_retries=1)
    try:
        measures = ray.get(task.remote(plan, tokenizer_files, f"runs:/{run_id}/model", tracking_uri, start_from))
    except Exception as e:  # noqa: BLE001 - the trained model is kept (registered, not promoted), the error named
        return Verdict((), "", error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:500]}")
    log_metrics(client_for(tracking_uri), run_id, {f"promote/{k}": v for k, v in measures.items()
                                                    if isinstance(v, float)})
    return decide(measures, plan.promote)


def run_training(recipe: Recipe, *, env: dict | None = None, sample_log_dir: str | None = None, log=print,
                 entrypoint: str = "python -m jobs.train") -> dict:
    """Train `recipe` on the connected Ray cluster. `env`: the driver's environment (the MLflow server when the
    recipe names none, storage credentials forwarded to the workers); `entrypoint`: the command the run's source
    tag names. Returns run id, tracking URI, registered model URI, the gate's verdict and the last checkpoint's
    path. The MLflow run ends FINISHED, or FAILED / KILLED when an error or a stop (Ctrl-C, SIGTERM) ends it first."""
    env = dict(os.environ if env is None else env)
    plan = resolve(recipe)  # the one place the recipe is derived from: workers get the plan
    plan, data_summary = check_run(plan)
    tracking_uri = resolve_tracking_uri(plan.run.tracking_uri, env)
    log(f"[train] recipe OK; data: {json.dumps(data_summary)}")
    storage_path, fs = ray_storage(plan.run.storage_path, plan.data.endpoint_url)
    check_resumable(plan, storage_path, fs)
    run_id = mlflow_run_for(plan, tracking_uri, data_summary)
    error: BaseException | None = None
    try:
        try:  # this attempt's code, data and recipe; a failure to record them is reported, not fatal
            log_lineage(client_for(tracking_uri), run_id, plan.recipe, entrypoint, plan.manifests)
        except Exception as e:  # noqa: BLE001
            log(f"[train] WARNING: the run's lineage (source version, dataset inputs, recipe) was not recorded: {e}")
        return _train_and_register(plan, env, tracking_uri, run_id, storage_path, fs, sample_log_dir, log)
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            client_for(tracking_uri).set_terminated(run_id, end_status(error))
        except Exception as e:  # noqa: BLE001 - the run's own error, if any, is the one to report
            log(f"[train] could not mark the MLflow run {run_id} {end_status(error)}: {e}")


def _train_and_register(plan: RunPlan, env: dict, tracking_uri: str, run_id: str, storage_path: str, fs,
                        sample_log_dir: str | None, log) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.distributed import process_group_backend
    from jobs.training.sft import WorkerJob, train_loop_per_worker

    tokenizer_files = tokenizer_files_for(plan)
    check_cluster_fits(plan)
    check_paths_on_every_node(list(plan.local_paths), log)
    worker_env = forwarded_worker_env(env, tracking_uri)
    tr, init_from, result, checkpoints = plan.train, None, None, []
    for stage in plan.stages:
        job = WorkerJob(plan, stage, tokenizer_files, tracking_uri, run_id, init_from=init_from,
                        sample_log_dir=sample_log_dir)
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config={"job": job},
            torch_config=TorchConfig(backend=process_group_backend(tr.use_gpu)),
            scaling_config=ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu,
                                         resources_per_worker={"CPU": tr.cpus_per_worker, **tr.resources_per_worker}),
            run_config=RunConfig(
                name=stage.run_folder,
                storage_path=storage_path, storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=tr.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=tr.keep_checkpoints),
                worker_runtime_env={"env_vars": worker_env},
            ),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        checkpoints.append(result.checkpoint)
        if not stage.final:
            # the next stage starts from this one's weights: the checkpoint itself (under storage_path), which
            # each worker copies to its own node; a copy on the driver would not be there on another node
            init_from = result.checkpoint
    first_speech = plan.first_speech_stage
    start_from = checkpoints[first_speech - 1] if first_speech else None
    verdict = promotion_verdict(plan, tokenizer_files, tracking_uri, run_id, start_from, worker_env)
    # the gate's verdict tags the run and the version; the recipe's alias only when every gate passed (an alias
    # that serving follows keeps pointing at the last version that passed)
    registered = register_run_model(client_for(tracking_uri), run_id, plan.run.registered_model,
                                    run_name=plan.run.name, tags=verdict.tags(),
                                    alias=plan.run.alias if verdict.passed else None)
    if verdict.enabled:
        where = (f"{registered} {'with' if verdict.passed else 'WITHOUT'} the alias @{plan.run.alias}"
                 if registered else "no registered_model")
        log(f"[train] promotion gate {verdict.summary()}; {where}")
    return {"run_id": run_id, "tracking_uri": tracking_uri, "registered": registered, "promoted": verdict.passed,
            "gate": verdict.tags(), "checkpoint": result.checkpoint.path if result and result.checkpoint else None}
