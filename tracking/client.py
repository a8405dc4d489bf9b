"""The MLflow tracking URI, resolved once, and the explicit clients that use it.

`client_for` is the one place an `MlflowClient` is constructed (ruff bans the class elsewhere): the tracking and
registry URIs always travel together, and no process-wide URI is set.
"""

from __future__ import annotations


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


def client_for(tracking_uri: str | None):
    """An `MlflowClient` for this tracking server, which is also its model registry."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)
