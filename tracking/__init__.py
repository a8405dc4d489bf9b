"""MLflow's one home: every conversation with the tracking server and the model registry goes through here.

Explicit clients only (`client.client_for`, the one place an `MlflowClient` is made): no `mlflow.set_tracking_uri`
or fluent `start_run`, which set process-wide state, so a pipeline that talks to several runs (the ablation: a
training run, an evaluation run, a comparison run) cannot write into whichever was started last.

- `client`: the tracking-URI resolver (`resolve_tracking_uri`, `tracking_uri_or_report`) and `client_for`;
- `experiments`: experiments found or made by name, tagged with their kind for MLflow's UI;
- `runs`: runs found or made by name (and identity tags), made fresh, resumed, ended with their status;
- `logs`: params and metrics in batches, and `MlflowRunLogger` (one run, optional system metrics);
- `lineage`: what made a model: source version tags, corpora as dataset inputs, the recipe as an artifact;
- `artifacts`: artifacts downloaded to a local folder or read back;
- `registry`: registered model versions (made from a run's `model` artifact, tagged, aliased) and the versions and
  runs a `models:/` or `runs:/` URI names;
- `models`: `models:/` and `runs:/` URIs (and local folders) resolved to a local folder of a saved SpeechLM.

It may import `models` and `data_ops`; never `jobs`, `services`, `bench` or `infra` (import-linter checks).
"""
