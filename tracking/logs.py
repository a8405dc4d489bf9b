"""Params and metrics logged to a run through an explicit client, in MLflow's batch sizes, and `MlflowRunLogger`,
which holds one run (a training worker's).

No global MLflow state: `MlflowRunLogger` holds its own client and run id (`mlflow.set_tracking_uri` /
`mlflow.start_run` would make every later call in the process write to whatever run was started last).
"""

from __future__ import annotations

import time

from tracking.client import client_for


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


class MlflowRunLogger:
    """Logs to one existing MLflow run through an explicit client; optionally samples system metrics (CPU, GPU,
    memory) into the same run, as `mlflow.start_run(log_system_metrics=True)` would, without a global active run."""

    def __init__(self, tracking_uri: str, run_id: str, *, system_metrics: bool = False):
        self.client = client_for(tracking_uri)
        self.run_id = run_id
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
            self.monitor.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_path, artifact_path)

    def log_dict(self, obj: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
