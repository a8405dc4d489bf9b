"""MLflow runs: found or made by name (a resubmission continues its run), made fresh, resumed, and ended with the
status of how the work ended."""

from __future__ import annotations

from tracking.experiments import experiment_id

RUN_TAG = "vtb.run_name"
RECIPE_TAG = "vtb.recipe"  # `Recipe.training_fingerprint()`: what the run's weights depend on


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


def resume_run(client, run_id: str) -> None:
    """Set a found run RUNNING again (a resubmission of work that had ended)."""
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def runs_named(client, experiment: str, run_name: str) -> list:
    """The runs of `experiment` tagged with this run name, newest first (none when the experiment is not there)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"])


def end_status(error: BaseException | None) -> str:
    """MLflow's run status for how the work ended: FINISHED, KILLED (stopped: Ctrl-C, `ray job stop`'s SIGTERM),
    or FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def create_run(client, experiment: str, run_name: str, tags: dict | None = None) -> str:
    """A new run (for work that starts from scratch each time, e.g. an encoder's CTC pretraining)."""
    return client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags or {}).info.run_id


def set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
