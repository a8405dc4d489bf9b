"""The local stack: a Ray head, an MLflow tracking server and an S3 endpoint (moto), all on 127.0.0.1.

Each service runs as a child process in its own process session, on a free port, with its log in
`<root>/logs/`, and is health-checked before `start()` returns. `stop()` sends SIGTERM, waits, then kills the
whole process group, so nothing is left behind. State (ports, pids) is kept in `<root>/state.json` so the CLI can
stop what an earlier command started.

    python -m infra.stack up [--services ray,mlflow,s3] [--root .stack]
    python -m infra.stack status | env | down

Ray auth: Ray 2.60 enables token auth when `~/.ray/auth_token` exists. This stack binds only to loopback and starts
the head with `RAY_AUTH_MODE=disabled` on purpose; clients it prints (`env`) carry the same setting. A shared
cluster should use token auth instead (see README).

Product code never imports this module: jobs and services receive addresses as arguments or config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
ALL_SERVICES = ("ray", "mlflow", "s3")
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    # The executables of this interpreter's environment, whether or not the venv is activated.
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 500
    except Exception:
        return False


def _ray_nodes(dashboard: str) -> list[dict]:
    """The cluster's nodes as the state API lists them ([] when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?detail=1", timeout=2.0) as r:
            return json.loads(r.read())["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _ray_node_alive(dashboard: str, node_name: str | None = None) -> bool:
    """A node is alive (the head: any node; else the node started with `--node-name=node_name`)."""
    return any(n.get("state") == "ALIVE" and (node_name is None or n.get("node_name") == node_name)
               for n in _ray_nodes(dashboard))


@dataclasses.dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str
    log: str
    extra: dict = dataclasses.field(default_factory=dict)


class LocalStack:
    """Start/stop the local services. Usable as a context manager (tests) or through the CLI."""

    def __init__(self, root: str | os.PathLike = ".stack", services: tuple[str, ...] = ALL_SERVICES,
                 ray_num_cpus: int | None = None):
        unknown = set(services) - set(ALL_SERVICES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; choose from {ALL_SERVICES}")
        self.root = Path(root).resolve()
        self.services_wanted = tuple(services)
        self.ray_num_cpus = ray_num_cpus
        self.services: dict[str, Service] = {}
        self._node_procs: dict[str, subprocess.Popen] = {}  # nodes this object started (add_node)
        self._node_specs: dict[str, tuple[list[str], dict[str, str]]] = {}  # their command and environment
        self.state_file = self.root / "state.json"

    # -- public ---------------------------------------------------------------------------------------------------
    def start(self) -> "LocalStack":
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self._load_state()
        try:
            # Ray last: its head gets the addresses of the others in its environment (`_service_env`)
            for name in sorted(self.services_wanted, key=lambda n: n == "ray"):
                if name in self.services and _pid_alive(self.services[name].pid):
                    continue
                self.services[name] = getattr(self, f"_start_{name}")()
                self._save_state()
        except Exception:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._load_state()
        # Ray's temp dirs (sockets, session logs, the jobs' working dirs): one per start, named by port, so they
        # would pile up in /tmp (hundreds of MB a day of tests); the stack's own service logs stay in `root/logs`
        ray_tmp = [Path(s.extra["temp_dir"]) for s in self.services.values() if "temp_dir" in s.extra]
        for name in reversed(list(self.services)):
            _terminate(self.services[name].pid, timeout)
        self.services.clear()
        for head_tmp in ray_tmp:
            for d in [head_tmp, *head_tmp.parent.glob(f"{head_tmp.name}-node-*")]:
                shutil.rmtree(d, ignore_errors=True)
        if self.state_file.exists():
            self.state_file.unlink()

    def add_node(self, name: str, num_cpus: int = 2, resources: dict[str, float] | None = None,
                 wait: bool = True) -> Service:
        """Another Ray node joining the head, on this machine (loopback): a multi-node cluster for tests and
        rehearsals. `resources`: custom resources it offers (e.g. one training slot, to spread workers over
        nodes). Stopped with the stack, or with `kill_node` (as a crash) / `remove_node`. `wait=False` returns
        once it is started (several nodes start at once); `wait_for_node` then waits for its registration."""
        self._load_state()
        if "ray" not in self.services:
            raise StackError("add_node needs the Ray head: start the stack with the ray service first")
        head = self.services["ray"]
        key = f"ray-node-{name}"
        # its own temp dir: nodes on one machine sharing the head's would race for the same socket names when
        # they start at once (the loser's raylet dies on "bind: Address already in use")
        cmd = [_bin("ray"), "start", "--block", f"--address={head.extra['gcs_address']}",
               f"--node-ip-address={HOST}", f"--node-name={name}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               f"--temp-dir={head.extra['temp_dir']}-node-{name}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self._node_specs[name] = (cmd, {"RAY_AUTH_MODE": "disabled", "PATH": path, "RAY_API_SERVER_ADDRESS": head.url,
                                        **self._service_env()})
        self._spawn_node(name)
        if wait:
            self.wait_for_node(name)
        return self.services[key]

    def _spawn_node(self, name: str) -> None:
        key = f"ray-node-{name}"
        cmd, env = self._node_specs[name]
        proc, log = self._spawn(key, cmd, env)
        self.services[key] = Service(key, proc.pid, 0, self.services["ray"].url, str(log), {"node_name": name})
        self._save_state()
        self._node_procs[name] = proc

    def wait_for_node(self, name: str, timeout: float = 120) -> None:
        """Until the node added as `name` is registered with the head (StackError if it exits or times out).

        A node that gives up because the head did not answer in time (Ray's "timed out during startup", which a
        busy small machine can cause) is started once more before this fails."""
        key, url = f"ray-node-{name}", self.services["ray"].url
        for attempt in range(2):
            try:
                self._wait(key, self._node_procs[name], Path(self.services[key].log),
                           lambda: _ray_node_alive(url, name), timeout=timeout)
                return
            except StackError as e:
                self.services.pop(key, None)
                self._save_state()
                if attempt == 1 or "timed out during startup" not in str(e):
                    raise
            self._spawn_node(name)

    def kill_node(self, name: str) -> None:
        """SIGKILL a node added by `add_node` and every process it started (its raylet, agents and workers): a
        machine lost mid-run, as far as Ray can tell."""
        self._load_state()
        service = self.services.pop(f"ray-node-{name}")
        for pid in _session_pids(service.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _pid_alive(service.pid)  # reap
        self._save_state()

    def remove_node(self, *names: str, timeout: float = 30.0) -> None:
        """Stop nodes added by `add_node`, all at once (SIGTERM; SIGKILL for what is left after `timeout`)."""
        from concurrent.futures import ThreadPoolExecutor

        self._load_state()
        pids = [self.services.pop(f"ray-node-{name}").pid for name in names]
        with ThreadPoolExecutor(max(1, len(pids))) as pool:
            list(pool.map(lambda pid: _terminate(pid, timeout), pids))
        self._save_state()

    def status(self) -> dict[str, dict]:
        self._load_state()
        return {n: {**dataclasses.asdict(s), "alive": _pid_alive(s.pid)} for n, s in self.services.items()}

    def env(self) -> dict[str, str]:
        """Client environment for the running services, for every Ray client there is.

        Ray's tools read three variables: `RAY_ADDRESS` is the cluster (GCS) address, what `ray.init()`, a job
        driver and `serve run` connect to; `ray job submit` and the job SDK take `RAY_API_SERVER_ADDRESS` (the
        dashboard's HTTP address) before it; `serve deploy`, `serve status` and `serve shutdown` read only
        `RAY_DASHBOARD_ADDRESS`. With all three set, each command of the README works as written.
        """
        self._load_state()
        env = {}
        if "ray" in self.services:
            ray = self.services["ray"]
            env["RAY_ADDRESS"] = ray.extra["gcs_address"]
            env["RAY_API_SERVER_ADDRESS"] = ray.url
            env["RAY_DASHBOARD_ADDRESS"] = ray.url
            env["RAY_AUTH_MODE"] = "disabled"
        env.update(self._service_env())
        return env

    def _service_env(self) -> dict[str, str]:
        """Where MLflow and S3 are: given to clients, and to the Ray head so that its jobs and Serve replicas see
        them as they would on a cluster whose nodes have them in their environment."""
        env = {}
        if "mlflow" in self.services:
            env["MLFLOW_TRACKING_URI"] = self.services["mlflow"].url
        if "s3" in self.services:
            env["AWS_ENDPOINT_URL"] = self.services["s3"].url
            env.update(S3_CREDENTIALS)
        return env

    @property
    def urls(self) -> dict[str, str]:
        return {n: s.url for n, s in self.services.items()}

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- services -----------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.root / "logs" / f"{name}.log"
        fh = open(log, "ab")
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True, cwd=self.root)
        except FileNotFoundError as e:
            raise StackError(f"cannot start {name}: `{cmd[0]}` is not installed in this environment "
                             f"({sys.executable}); run infra/install.sh") from e
        finally:
            fh.close()
        return proc, log

    def _wait(self, name: str, proc: subprocess.Popen, log: Path, check, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                _terminate(proc.pid, 10)  # what it started before failing (Ray's GCS, say) goes with it
                raise StackError(f"{name} exited with code {proc.returncode} while starting; log {log}:\n{tail}")
            if check():
                return
            time.sleep(0.5)
        _terminate(proc.pid, 10)
        raise StackError(f"{name} did not become healthy within {timeout:.0f} s; see {log}")

    def _start_ray(self, attempts: int = 3) -> Service:
        # `ray start` gives its raylet a fixed 30 s to register with the GCS; on a machine busy with other work
        # (a training run, an install) it can miss that and exit. Starting again is what a user would do.
        for attempt in range(1, attempts + 1):
            try:
                return self._start_ray_once()
            except StackError as e:
                if attempt == attempts or "timed out during startup" not in str(e):
                    raise
                print(f"[stack] the Ray head did not register in time (a busy machine?); starting it again "
                      f"({attempt + 1}/{attempts})", file=sys.stderr, flush=True)

    def _start_ray_once(self) -> Service:
        gcs, dash, client, agent = free_port(), free_port(), free_port(), free_port()
        # Short path: Ray puts unix sockets under the temp dir and they are limited to 107 bytes.
        temp_dir = Path("/tmp") / f"vtb-ray-{gcs}"
        cmd = [_bin("ray"), "start", "--head", "--block", f"--port={gcs}", f"--node-ip-address={HOST}",
               f"--dashboard-host={HOST}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}",
               "--disable-usage-stats", "--include-dashboard=true", f"--temp-dir={temp_dir}"]
        if self.ray_num_cpus is not None:
            cmd.append(f"--num-cpus={self.ray_num_cpus}")
        # Jobs run `python ...` on the cluster: on this one-machine cluster that must be this environment's python
        # (a real cluster's image has the project installed the same way), whether or not the venv is activated.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        url = f"http://{HOST}:{dash}"
        # RAY_API_SERVER_ADDRESS: Ray's own state-API clients in workers (Train's PlacementGroupCleaner) otherwise
        # look the cluster up by scanning local processes, and fail when the machine runs a second Ray instance
        proc, log = self._spawn("ray", cmd, {"RAY_AUTH_MODE": "disabled", "PATH": path, "RAY_API_SERVER_ADDRESS": url,
                                             **self._service_env()})
        # The dashboard answers before the head node has registered and before its agent (which runs submitted
        # jobs) is up; a job submitted then fails ("No available agent"). Wait for all three.
        self._wait("ray", proc, log, lambda: _http_ok(f"{url}/api/version") and _ray_node_alive(url)
                   and _http_ok(f"http://{HOST}:{agent}/api/local_raylet_healthz"), timeout=180)
        return Service("ray", proc.pid, dash, url, str(log),
                       {"gcs_address": f"{HOST}:{gcs}", "temp_dir": str(temp_dir)})

    def _start_mlflow(self) -> Service:
        port = free_port()
        data = self.root / "mlflow"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [_bin("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
               "--artifacts-destination", str(data / "artifacts"), "--serve-artifacts"]
        # The job consumers (seven huey processes) serve MLflow's GenAI scorer jobs, which this product does not use.
        proc, log = self._spawn("mlflow", cmd, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        url = f"http://{HOST}:{port}"
        self._wait("mlflow", proc, log, lambda: _http_ok(f"{url}/health"), timeout=120)
        return Service("mlflow", proc.pid, port, url, str(log), {"data": str(data)})

    def _start_s3(self) -> Service:
        port = free_port()
        proc, log = self._spawn("s3", [_bin("moto_server"), "-H", HOST, "-p", str(port)])
        url = f"http://{HOST}:{port}"
        self._wait("s3", proc, log, lambda: _http_ok(f"{url}/moto-api/"), timeout=60)
        return Service("s3", proc.pid, port, url, str(log))

    # -- state ----------------------------------------------------------------------------------------------------
    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps({n: dataclasses.asdict(s) for n, s in self.services.items()}, indent=2))

    def _load_state(self) -> None:
        if self.state_file.exists() and not self.services:
            self.services = {n: Service(**d) for n, d in json.loads(self.state_file.read_text()).items()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists": reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _session_pids(sid: int) -> list[int]:
    """Every process in session `sid` (a service leads its own session; Ray's workers stay in their raylet's)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM the service (it shuts its children down), then SIGKILL whatever is left in its process group."""
    pgid = pid  # each service leads its own session (start_new_session=True)
    if not _pid_alive(pid) and not _group_alive(pgid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while time.time() < deadline and (_pid_alive(pid) or _group_alive(pgid)):
        time.sleep(0.25)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.5)
    _pid_alive(pid)  # reap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--root", default=os.environ.get("VTB_STACK_ROOT", ".stack"), help="state and log folder")
    ap.add_argument("--services", default=",".join(ALL_SERVICES), help=f"comma-separated subset of {ALL_SERVICES}")
    # More logical CPUs than cores: a one-machine dev cluster must fit training workers *and* the Ray Data read
    # tasks that feed them (with only the real cores, 2 workers on 2 cores leave the reads nothing and hang).
    ap.add_argument("--ray-num-cpus", type=int, default=(os.cpu_count() or 2) + 4)
    args = ap.parse_args(argv)
    stack = LocalStack(args.root, tuple(s for s in args.services.split(",") if s), args.ray_num_cpus)
    try:
        if args.command == "up":
            stack.start()
            for name, url in stack.urls.items():
                print(f"{name:7s} {url}")
            print(f"logs    {stack.root / 'logs'}")
        elif args.command == "down":
            stack.stop()
            print("stack stopped")
        elif args.command == "status":
            print(json.dumps(stack.status(), indent=2))
        else:
            for k, v in stack.env().items():
                print(f"export {k}={v}")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
