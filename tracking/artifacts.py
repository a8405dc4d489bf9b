"""Run artifacts: downloaded to a local folder, or a logged JSON file read back."""

from __future__ import annotations

import json
from pathlib import Path


def download(artifact_uri: str, tracking_uri: str | None, dst: str | None = None) -> Path:
    """The artifact (a file or folder: `runs:/<id>/path`, a registered version's source, ...) in a local folder
    (`dst`, else MLflow's cache). Raises MLflow's `MlflowException` when it is not there."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst, tracking_uri=tracking_uri))


def read_json(client, run_id: str, path: str):
    """A JSON artifact of the run (e.g. a table `log_table` wrote), parsed."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text())
