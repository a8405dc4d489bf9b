"""The README's "Serving" section run as written: its shell block (stack environment, `serve deploy` of the shipped
`services/serve_config.yaml`, `serve status`), its Python snippet against the endpoint, and `serve run` of the same
config, on the session's local stack with the config's model registered as `make demo` registers it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from tests.services.serve_app import wait_healthy

# `make test-slow` (about 55 s): the suite's 15 minutes have no room for it; tests/services/test_chat_api.py deploys
# and calls the same Serve application
pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "services" / "serve_config.yaml"


def readme_serving_blocks(lang: str) -> list[str]:
    """The code blocks in `lang` of the README's "## Serving" section, verbatim."""
    section = (ROOT / "README.md").read_text().split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _register_as_make_demo_does(tracking: str, model_uri: str, folder: Path) -> None:
    from mlflow.tracking import MlflowClient

    name, alias = model_uri[len("models:/"):].split("@")
    client = MlflowClient(tracking, registry_uri=tracking)
    exp = client.get_experiment_by_name("readme-serving") or client.get_experiment(
        client.create_experiment("readme-serving"))
    run = client.create_run(exp.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)


def _ask_as_the_readme_does(work: Path, env: dict) -> str:
    (snippet,) = readme_serving_blocks("python")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_serving_commands_work_as_written(stack, tmp_path):
    import torch

    from models.config import tiny
    from models.speechlm import build_speechlm
    from models.tokenizer import build_tiny_tokenizer

    config = yaml.safe_load(CONFIG.read_text())
    http, args = config["http_options"], config["applications"][0]["args"]
    with socket.socket() as s:  # the shipped config's port; a clear failure if this machine has it taken
        assert s.connect_ex((http["host"], http["port"])) != 0, f"{http['host']}:{http['port']} is in use here"
    torch.manual_seed(0)
    build_speechlm(tiny(), tokenizer=build_tiny_tokenizer(["Listen: Answer briefly."])).save_pretrained(
        tmp_path / "model")
    _register_as_make_demo_does(stack.urls["mlflow"], args["model"], tmp_path / "model")

    work = tmp_path / "work"  # a user's shell in the repository: its services/ folder and their question.wav
    work.mkdir()
    (work / "services").symlink_to(ROOT / "services")
    sf.write(work / "question.wav", (0.1 * np.sin(np.arange(24000) / 7)).astype(np.float32), 16000)
    # a fresh shell: this environment's executables first (as an activated venv has them), the stack's folder
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ["HOME"],
           "VTB_STACK_ROOT": str(stack.root)}
    base = f"http://{http['host']}:{http['port']}"
    (shell,) = readme_serving_blocks("bash")
    shutdown = ["bash", "-c", 'eval "$(python -m infra.stack env)" && serve shutdown -y']
    try:
        proc = subprocess.run(["bash", "-euc", shell], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert re.search(r"status: (DEPLOYING|RUNNING)", proc.stdout), proc.stdout[-2000:]
        wait_healthy(base)
        out = _ask_as_the_readme_does(work, env)
        assert "prompt_tokens=" in out and "audio_tokens=" in out, out  # the print of r.usage

        # the comment's alternative: `serve run` of the same config, in the foreground, after the same `eval`
        subprocess.run(shutdown, cwd=work, env=env, capture_output=True, timeout=120, check=True)
        run_cmd = re.search(r"# or in the foreground: (serve run \S+)", shell).group(1)
        fg = subprocess.Popen(["bash", "-c", f'eval "$(python -m infra.stack env)" && exec {run_cmd}'], cwd=work,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
        try:
            wait_healthy(base, proc=fg)
            assert "prompt_tokens=" in _ask_as_the_readme_does(work, env)
        finally:
            os.killpg(fg.pid, signal.SIGINT)  # Ctrl-C: serve run removes the app and exits
            try:
                fg.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(fg.pid, signal.SIGKILL)
    finally:
        subprocess.run(shutdown, cwd=work, env=env, capture_output=True, timeout=120)
