"""What made a model, recorded on its MLflow run where the MLflow UI shows it: the code version (MLflow's own
`mlflow.source.*` tags, so the run page's "Source" names the commit; a digest of the code beside it), the corpora as
dataset inputs (name, source URI, digest, counts per type, with MLflow's `mlflow.data.context` tag: training or
evaluation), and the recipe file as an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_DIRTY, MLFLOW_GIT_REPO_URL,
                                      MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE)

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "models", "data_ops", "services", "tracking")
SOURCE_UNKNOWN_TAG = "vtb.source.unknown"
SOURCE_DIGEST_TAG = "vtb.source.digest"
DIFF_ARTIFACT = "source/uncommitted.diff"
MAX_DIFF_BYTES = 5 * 1024 * 1024


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30).stdout


def source_digest(repo: Path = REPO) -> str:
    """A digest of the code this process runs (the packages' Python and YAML files and pyproject.toml): names the
    version even where git cannot, and tells apart two runs of one commit with different uncommitted changes."""
    h = hashlib.sha256()
    files = [repo / "pyproject.toml"] + sorted(p for pkg in PACKAGES for ext in ("*.py", "*.yaml")
                                               for p in (repo / pkg).rglob(ext))
    for path in files:
        if path.is_file():
            h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def source_version(entrypoint: str, repo: Path = REPO, env: dict | None = None) -> tuple[dict[str, str], str | None]:
    """(tags, uncommitted diff or None) of the code this process runs. `ray job submit` uploads the working
    directory without its `.git`, so a job's driver finds no repository: then the submitter's `VTB_GIT_COMMIT` (and
    `VTB_GIT_DIRTY`) name the commit (`jobs.demo` sets them), else the tags say that none is known. The code's
    digest is there either way."""
    env = os.environ if env is None else env
    tags = {MLFLOW_SOURCE_NAME: entrypoint, MLFLOW_SOURCE_TYPE: "JOB", SOURCE_DIGEST_TAG: source_digest(repo)}
    try:
        commit = _git("rev-parse", "HEAD", cwd=repo).strip()
        # tracked files only: untracked ones (local corpora, notes) do not change what the code does
        status = _git("status", "--porcelain", "--untracked-files=no", cwd=repo)
        branch = _git("rev-parse", "--abbrev-ref", "HEAD", cwd=repo).strip()
        remote = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True,
                                timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        if env.get("VTB_GIT_COMMIT"):
            tags.update({MLFLOW_GIT_COMMIT: env["VTB_GIT_COMMIT"],
                         MLFLOW_GIT_DIRTY: env.get("VTB_GIT_DIRTY", "unknown")})
            return tags, None
        why = getattr(e, "stderr", None) or str(e)
        tags[SOURCE_UNKNOWN_TAG] = (f"no git repository at {repo} ({why.strip()[:200]}) and no VTB_GIT_COMMIT in the "
                                    "job's environment; vtb.source.digest names the code")
        return tags, None
    tags.update({MLFLOW_GIT_COMMIT: commit, MLFLOW_GIT_DIRTY: str(bool(status.strip())).lower()})
    if branch and branch != "HEAD":
        tags[MLFLOW_GIT_BRANCH] = branch
    if remote:
        tags[MLFLOW_GIT_REPO_URL] = remote
    try:
        diff = _git("diff", "HEAD", cwd=repo) if status.strip() else None
    except (OSError, subprocess.SubprocessError):
        diff = None
    return tags, diff


def corpus_datasets(sources: dict[str, list[str]], endpoint_url: str | None, context: str,
                    manifests: dict | None = None) -> list:
    """MLflow `DatasetInput`s, one per data type: its corpora (source), a digest of their manifests' entries for
    the type (which shards, how many cuts), and the counts (profile). `manifests` (by URI): those already read."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from data_ops.shards import known_manifest

    inputs = []
    for dtype, uris in sources.items():
        entries, cuts, hours, shards = [], 0, 0.0, 0
        for uri in uris:
            info = known_manifest(uri, endpoint_url, manifests).types.get(dtype)
            if info is None:
                continue
            entries.append({"uri": uri, "shards": [s.__dict__ for s in info.shards]})
            cuts, hours, shards = cuts + info.num_cuts, hours + info.hours, shards + len(info.shards)
        if not entries:
            continue
        digest = hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()[:16]
        name = f"{dtype} ({', '.join(Path(u.rstrip('/')).name for u in uris)})"
        dataset = Dataset(name=name, digest=digest, source_type="vtblender-shar",
                          source=json.dumps({"uris": uris}),
                          profile=json.dumps({"data_type": dtype, "num_cuts": cuts, "hours": round(hours, 4),
                                              "shards": shards}))
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def log_lineage(client, run_id: str, recipe, entrypoint: str, manifests: dict | None = None) -> None:
    """Source tags (and the uncommitted diff as an artifact), dataset inputs, and the recipe as `recipe.yaml`.
    `manifests` (by URI): the corpora's, where the caller has read them."""
    import yaml

    tags, diff = source_version(entrypoint)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if diff:
        client.log_text(run_id, diff.encode()[:MAX_DIFF_BYTES].decode(errors="ignore"), DIFF_ARTIFACT)
    endpoint = recipe.data.endpoint_url
    inputs = corpus_datasets({t: src.uris for t, src in recipe.data.sources.items()}, endpoint, "training", manifests)
    if recipe.promote.eval_uris:
        inputs += corpus_datasets({t: recipe.promote.eval_uris for t in ("asr_ast", "text")}, endpoint, "evaluation",
                                  manifests)
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    client.log_text(run_id, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), "recipe.yaml")
