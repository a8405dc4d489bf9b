"""infra/k8s/: the KubeRay manifests are valid for KubeRay v1.7.0 (schema as `kubectl apply` checks it, plus the
keys the API server would silently drop), and they run what the local stack runs: existing entrypoints, recipes
and suites, a Serve config the chat app accepts, the image's Ray version."""

from __future__ import annotations

import gzip
import json
import shlex
from importlib.util import find_spec
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
CRDS = Path(__file__).with_name("kuberay_crds")


def _schemas() -> dict[str, dict]:
    out = {}
    for f in CRDS.glob("*.schema.json.gz"):
        d = json.loads(gzip.decompress(f.read_bytes()))
        out[d["kind"]] = d["openAPIV3Schema"]
    return out


SCHEMAS = _schemas()


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs.append((f.name, d))
    return docs


def undeclared_keys(value, schema: dict, path: str = "") -> list[str]:
    """Keys of `value` its schema does not declare: the API server prunes them without a word (a typo'd
    `rayStartParam` would just vanish). Maps (`additionalProperties`) and preserve-unknown-fields are followed."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                found += undeclared_keys(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                found += undeclared_keys(v, extra, f"{path}.{k}")
            elif props is not None or extra is False:
                found.append(f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            found += undeclared_keys(v, schema["items"], f"{path}[{i}]")
    return found


def test_the_vendored_schemas_are_kuberays_three_kinds():
    assert set(SCHEMAS) == {"RayCluster", "RayJob", "RayService"}


@pytest.mark.parametrize("name,doc", [d for d in _documents() if d[1]["apiVersion"] == "ray.io/v1"],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_ray_manifests_validate_against_kuberay_v1_7_0(name, doc):
    schema = SCHEMAS[doc["kind"]]
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
    assert undeclared_keys(doc, schema) == []


def test_the_undeclared_key_check_catches_what_the_cluster_would_drop():
    doc = yaml.safe_load((K8S / "raycluster.yaml").read_text())
    doc["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}  # typo of rayStartParams
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}  # of resources
    jsonschema.validate(doc, SCHEMAS["RayCluster"], cls=jsonschema.Draft7Validator)  # the schema lets both pass
    assert undeclared_keys(doc, SCHEMAS["RayCluster"]) == [
        ".spec.headGroupSpec.rayStartParam", ".spec.workerGroupSpecs[0].template.spec.containers[0].resource"]
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMAS["RayCluster"], cls=jsonschema.Draft7Validator)


def _clusters():
    for name, doc in _documents():
        if doc["kind"] == "RayCluster":
            yield name, doc["spec"]
        elif doc["kind"] == "RayService":
            yield name, doc["spec"]["rayClusterConfig"]


def test_clusters_run_the_tested_ray_on_a_cpu_head_with_gpu_workers_and_the_shared_environment():
    config = {d["metadata"]["name"]: d for _, d in _documents() if d["kind"] in ("ConfigMap", "Secret")}
    dockerfile = (K8S / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    for name, spec in _clusters():
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        gpu = [g for g in spec["workerGroupSpecs"]
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu, f"{name}: no GPU worker group"
        pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
        for pod in pods:
            for c in pod["containers"]:
                refs = [r.get("configMapRef", r.get("secretRef"))["name"] for r in c["envFrom"]]
                assert refs and all(r in config for r in refs), (name, refs)
                refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e]
                assert all(r in config for r in refs), (name, refs)
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(config["vtblender-env"]["data"])


def test_jobs_submit_existing_entrypoints_with_existing_recipes_and_suites():
    jobs = [d for _, d in _documents() if d["kind"] == "RayJob"]
    assert {j["metadata"]["name"] for j in jobs} == {"vtblender-data", "vtblender-train", "vtblender-evaluate"}
    for job in jobs:
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "vtblender"}
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"] and find_spec(argv[2]) is not None, argv
        for arg in argv[3:]:
            if arg.startswith(("jobs/", "services/")):
                assert (REPO / arg).is_file(), f"{job['metadata']['name']}: {arg} does not exist"


def test_rayservice_serve_config_is_one_the_chat_app_accepts():
    from ray.serve.schema import ServeDeploySchema

    from services.chat_app import ServeConfig

    (service,) = [d for _, d in _documents() if d["kind"] == "RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what `serve deploy` and KubeRay's Serve API take
    (app,) = serve_config["applications"]
    assert app["import_path"] == "services.chat_app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.num_gpus_per_replica == 1 and cfg.api_key_env == "VTB_API_KEY"
