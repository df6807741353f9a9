"""A Flower federation on 127.0.0.1 for tests, benchmarks and demos: one SuperLink, N SuperNodes, `flwr run`.

Runtime dependency installation is off (it would `uv sync` a CUDA torch into a fresh environment per run), so the
apps import the fedfactory installed next to this file. Every process starts in its own session, on free
loopback ports, with FLWR_HOME in the caller's directory, and is stopped with all its descendants: the SuperLink
and SuperNodes start flower-superexec (and flwr-simulation, Ray) in new sessions that outlive them otherwise.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONNECTION = "loopback"  # the name of the SuperLink connection in $FLWR_HOME/config.toml
FEDERATION = "@none/default"  # the federation a SuperLink without accounts serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces and parentheses; the parent pid follows the last ")".
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we read
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    kids, tree = _children(), [pid]
    for p in tree:
        tree.extend(kids.get(p, []))
    return tree


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent just has not reaped it yet


def stop_tree(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM a process and its descendants (collected first: they are re-parented once it exits), then SIGKILL."""
    tree = process_tree(proc.pid) if proc.poll() is None else [proc.pid]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        proc.poll()  # reap our own child so it does not linger as a zombie
        time.sleep(0.2)
    for pid in tree:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


@dataclass
class Federation:
    """A running loopback federation; use as a context manager so everything stops."""

    home: Path
    simulation: bool
    num_nodes: int
    procs: list[subprocess.Popen] = field(default_factory=list)  # SuperLink first, then the SuperNodes
    env: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        # SuperNodes first: they deregister from a live SuperLink at once instead of retrying a dead one.
        for proc in reversed(self.procs):
            stop_tree(proc)
        self.procs.clear()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.home / f"{name}.log", "ab") as logf:  # the child keeps its own descriptor
            proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True, cwd=self.home)
        self.procs.append(proc)
        return proc

    def flwr(self, args: list[str], timeout_s: float, log_name: str = "flwr") -> subprocess.CompletedProcess:
        """Run the flwr CLI against this federation; output goes to <home>/<log_name>.log as well."""
        proc = subprocess.run([venv_bin("flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        with open(self.home / f"{log_name}.log", "a") as f:
            f.write(proc.stdout + proc.stderr)
        return proc

    def run(self, app_dir: str | Path, run_config: str | Path, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
        """`flwr run APP loopback --stream --run-config FILE`: returns once the ServerApp has finished."""
        return self.flwr(["run", str(app_dir), CONNECTION, "--stream", "--run-config", str(run_config)], timeout_s,
                         log_name="run")

    def wait_for_nodes(self, timeout_s: float = 120.0, count: int | None = None) -> None:
        """Return once `count` (default all) SuperNodes are online (deployment only; the ServerApp waits anyway)."""
        count = self.num_nodes if count is None else count
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = self.flwr(["supernode", "list", CONNECTION, "--format", "json"], timeout_s, log_name="setup")
            try:
                nodes = json.loads(done.stdout).get("nodes", [])
            except json.JSONDecodeError:
                nodes = []
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return
            time.sleep(1)
        raise TimeoutError(f"{count} SuperNodes not online after {timeout_s}s:\n{self.logs()}")

    def logs(self, tail_chars: int = 3000) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-tail_chars:]}"
                         for p in sorted(self.home.glob("*.log")))


def venv_bin(name: str) -> str:
    """A console script installed next to this Python (flwr, flower-superlink, flower-supernode)."""
    return str(Path(sys.executable).parent / name)


def site_node_config(site: str, data_root: str | Path) -> str:
    """The node config of a deployment site: its name and its data folder."""
    return f"site='{site}' data-root='{Path(data_root).resolve()}'"


@dataclass(frozen=True)
class Security:
    """TLS and SuperNode authentication for a deployment: PEM files of a CA and of the SuperLink's certificate
    (valid for 127.0.0.1), and the SuperNodes' keys in OpenSSH format (EC, a NIST curve, as Flower requires)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...] = ()  # private key of SuperNode k; () = no SuperNode authentication
    registered: tuple[Path, ...] = ()  # public keys registered with `flwr supernode register` before nodes start


def start(home: str | Path, num_nodes: int, simulation: bool, startup_timeout_s: float = 60.0,
          num_cpus: int = 0, partitions: tuple[int, ...] | None = None,
          node_configs: list[str] | None = None, security: Security | None = None) -> Federation:
    """Start a SuperLink (simulation or deployment) and, for deployment, `num_nodes` SuperNodes on loopback.

    Node k gets `--node-config "partition-id=k num-partitions=num_nodes"`; in simulation the engine sets them.
    `partitions` starts only those SuperNodes (deployment), as if the others were down. `node_configs` starts one
    SuperNode per node config instead (a deployment's sites, see site_node_config). `security` turns on TLS
    everywhere and, with node keys, SuperNode authentication (only registered public keys may connect).
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    fed = Federation(home, simulation, num_nodes, env=env)
    port = free_port()
    trust = f'root-certificates = "{security.ca_cert}"' if security else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\n{trust}\n')
    link_tls = ["--insecure"] if security is None else [
        "--ssl-ca-certfile", str(security.ca_cert), "--ssl-certfile", str(security.server_cert),
        "--ssl-keyfile", str(security.server_key), *(["--enable-supernode-auth"] if security.node_keys else [])]
    try:
        # --control-api-address and --fleet-api-address only keep the legacy gRPC servers off 0.0.0.0.
        link = fed._start("superlink", [
            venv_bin("flower-superlink"), *link_tls, "--disable-runtime-dependency-installation",
            "--port", str(port), "--control-api-address", f"127.0.0.1:{free_port()}",
            *(["--simulation"] if simulation else ["--fleet-api-address", f"127.0.0.1:{free_port()}"])])
        wait_for_port(port, startup_timeout_s, link)
        if simulation:
            done = fed.flwr(["federation", "simulation-config", FEDERATION, CONNECTION, "--num-supernodes",
                             str(num_nodes), "--client-resources-num-cpus", "1", "--init-args-num-cpus",
                             str(num_cpus or len(os.sched_getaffinity(0)))], startup_timeout_s, log_name="setup")
            if done.returncode != 0:
                raise RuntimeError(f"flwr federation simulation-config failed:\n{done.stdout}{done.stderr}")
        else:
            if node_configs is None:
                node_configs = [f"partition-id={k} num-partitions={num_nodes}"
                                for k in (range(num_nodes) if partitions is None else partitions)]
            for public_key in security.registered if security else ():
                done = fed.flwr(["supernode", "register", str(public_key), CONNECTION], startup_timeout_s,
                                log_name="setup")
                if done.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed:\n{done.stdout}{done.stderr}")
            for k, node_config in enumerate(node_configs):
                node_tls = ["--insecure"] if security is None else ["--root-certificates", str(security.ca_cert)]
                if security and security.node_keys:
                    node_tls += ["--auth-supernode-private-key", str(security.node_keys[k])]
                fed._start(f"supernode-{k}", [
                    venv_bin("flower-supernode"), *node_tls, "--superlink", f"127.0.0.1:{port}",
                    "--port", str(free_port()), "--node-config", node_config])
    except BaseException:
        fed.stop()
        raise
    return fed
