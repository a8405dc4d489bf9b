"""The local stack starts, answers, and stops cleanly, and starts again in the same folder from the command line,
leaving no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest

from infra.stack import LocalStack

pytestmark = pytest.mark.integration


def _descendants_alive(pgids: list[int]) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) in pgids]


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -eo" not in line]


def test_stack_starts_answers_and_stops_then_the_cli_restarts_it_leaving_nothing(tmp_path):
    """Started from Python with every service, then again in the same folder by `python -m infra.stack up` and
    stopped by `down`: each time nothing of it is left behind."""
    stack = LocalStack(tmp_path / "stack", ray_num_cpus=1)
    with stack:
        urls = stack.urls
        assert set(urls) == {"ray", "mlflow", "s3"}
        assert all(u.startswith("http://127.0.0.1:") for u in urls.values())
        with urllib.request.urlopen(urls["mlflow"] + "/health", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(urls["ray"] + "/api/version", timeout=10) as r:
            assert r.status == 200
        env = stack.env()
        # one variable per kind of Ray client: ray.init / serve run, job submission, serve deploy
        assert env["RAY_ADDRESS"] == stack.services["ray"].extra["gcs_address"]
        assert env["RAY_API_SERVER_ADDRESS"] == env["RAY_DASHBOARD_ADDRESS"] == urls["ray"]
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="round0")
        s3.put_object(Bucket="round0", Key="k", Body=b"v")
        assert s3.get_object(Bucket="round0", Key="k")["Body"].read() == b"v"
        pgids = [s.pid for s in stack.services.values()]
        ray_tmp = stack.services["ray"].extra["temp_dir"]
        assert (stack.root / "state.json").exists()
        assert all((stack.root / "logs" / f"{n}.log").exists() for n in urls)
    assert _descendants_alive(pgids) == []
    assert _processes_mentioning(ray_tmp) == [] and not Path(ray_tmp).exists()  # nor its temp dir
    assert _processes_mentioning(str(stack.root)) == []
    assert not (stack.root / "state.json").exists()

    root = str(stack.root)  # the same folder again, its logs and state of the first round still there
    try:
        up = subprocess.run([sys.executable, "-m", "infra.stack", "up", "--root", root, "--services", "s3,mlflow"],
                            capture_output=True, text=True, env={**os.environ}, timeout=180)
        assert up.returncode == 0, up.stderr
        assert "s3" in up.stdout and "mlflow" in up.stdout
        assert _processes_mentioning(root)
    finally:
        down = subprocess.run([sys.executable, "-m", "infra.stack", "down", "--root", root], capture_output=True,
                              text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert _processes_mentioning(root) == []
    assert not (stack.root / "state.json").exists()


def test_missing_binary_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("infra.stack._bin", lambda name: f"/nonexistent/{name}")
    with pytest.raises(Exception, match="moto_server` is not installed"):
        LocalStack(tmp_path, services=("s3",)).start()


def test_unknown_service_is_rejected(tmp_path):
    with pytest.raises(Exception, match="unknown service"):
        LocalStack(tmp_path, services=("ray", "postgres"))
