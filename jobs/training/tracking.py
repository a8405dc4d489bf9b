"""MLflow for the jobs: one resolver for the tracking URI, explicit clients, runs found or made by name.

No `mlflow.set_tracking_uri` / fluent `start_run` anywhere in the jobs: those set process-wide state, so a
pipeline that talks to two runs (the ablation: a training run, an evaluation run, a comparison run) would write
into whichever was started last.
"""

from __future__ import annotations

import time

RUN_TAG = "vtb.run_name"
RECIPE_TAG = "vtb.recipe"  # `Recipe.training_fingerprint()`: what the run's weights depend on


class TrackingError(ValueError):
    """The MLflow tracking URI is missing or unusable (the message says which and how to fix it)."""


def resolve_tracking_uri(uri: str | None, env: dict | None = None) -> str:
    """The tracking URI to use: `uri` (a flag or the recipe), else $MLFLOW_TRACKING_URI from `env`. It must be
    absolute: Ray workers run in their own working directories, where a relative path means another store."""
    uri = uri or (env or {}).get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("no MLflow tracking server: pass --tracking-uri, set run.tracking_uri in the recipe, or "
                            "set MLFLOW_TRACKING_URI (the local stack prints it: python -m infra.stack env)")
    if not (uri.startswith(("http://", "https://", "databricks", "sqlite:////", "file:/"))):
        raise TrackingError(f"MLflow tracking URI {uri!r} must be absolute (http(s)://... or sqlite:////abs/path): "
                            "Ray workers run in their own working directories")
    return uri


def tracking_uri_or_report(uri: str | None, env: dict) -> str | None:
    """For entrypoints: `resolve_tracking_uri`, or None after printing why there is none (the caller exits 2)."""
    import sys

    try:
        return resolve_tracking_uri(uri, env)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def client_for(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


# MLflow 3's UI opens an experiment by its kind; an untagged one opens on the GenAI traces overview (empty here).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def experiment_id(client, name: str) -> str:
    """The experiment's id, created when it does not exist yet; tagged as model training (its runs, datasets and
    sources are what the UI shows first)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException as e:  # another job made it meanwhile (two jobs submitted at once): use that one
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version, or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def find_or_create_run(client, experiment: str, run_name: str, identity: dict[str, str] | None = None
                       ) -> tuple[str, bool]:
    """(run id, created): the run tagged with this run name and every `identity` tag (a resubmission continues
    it), else a new one tagged so.

    Why the identity: a training run's identity is its recipe (`RECIPE_TAG`), not only its name. A recipe changed
    under an old name (its run folder deleted to start again) gets a run of its own, beside the old one, instead
    of logging its metrics into a run whose params describe another training."""
    exp_id = experiment_id(client, experiment)
    tags = {RUN_TAG: run_name, **(identity or {})}
    found = client.search_runs([exp_id], filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id, False
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id, True


def end_status(error: BaseException | None) -> str:
    """MLflow's run status for how the work ended: FINISHED, KILLED (stopped: Ctrl-C, `ray job stop`'s SIGTERM),
    or FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def create_run(client, experiment: str, run_name: str, tags: dict | None = None) -> str:
    """A new run (for work that starts from scratch each time, e.g. an encoder's CTC pretraining)."""
    return client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags or {}).info.run_id


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):  # log_batch's per-call limit
        client.log_batch(run_id, metrics=items[i:i + 1000])
