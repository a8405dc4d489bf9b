"""The MLflow model registry: a run's `model` artifact registered as a new version (tagged, aliased when it may be
served), and the version or run a `models:/` / `runs:/` URI names."""

from __future__ import annotations

from tracking.runs import RUN_TAG, set_tags

DESCRIPTION = "VoiceTextBlender SpeechLM (vtblender)"


def register_run_model(client, run_id: str, name: str | None, *, run_name: str, tags: dict[str, str],
                       alias: str | None = None) -> str | None:
    """Tag the run with `tags`; register the run's `model` artifact as a new version of `name`, tagged the same
    (and with the run name), with `alias` when one is given (an alias that serving follows keeps pointing at the
    last version given it). Returns `models:/name/version` (None without a `name`: nothing registered)."""
    from mlflow.exceptions import MlflowException

    set_tags(client, run_id, tags)
    if not name:
        return None
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=DESCRIPTION)
    run = client.get_run(run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                          tags={RUN_TAG: run_name, **tags})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}"


def registered_version(client, uri: str):
    """The MLflow `ModelVersion` a `models:/name@alias` or `models:/name/3` URI names."""
    rest = uri.removeprefix("models:/").rstrip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, number = rest.rsplit("/", 1)
    return client.get_model_version(name, number)


def training_run_of(client, model_uri: str) -> str | None:
    """The id of the run that logged the model a `runs:/` or `models:/` URI names (None for a folder)."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/")[0]
    if model_uri.startswith("models:/"):
        return registered_version(client, model_uri).run_id
    return None
