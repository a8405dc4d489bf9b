"""MLflow experiments: found or made by name, tagged with the kind MLflow's UI opens them as."""

from __future__ import annotations

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
