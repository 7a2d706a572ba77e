"""Private redis-server processes on free loopback ports, for tests and benchmarks.

Each server lives in a directory of its own, keeps nothing on disk (no RDB, no AOF), and is
stopped by `stop()` (or on leaving a `with` block). A cluster is three or more such servers
with cluster mode on, joined by `redis-cli --cluster create`.
"""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from kvshelf import children
from kvshelf.ports import free_port

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; run `make setup` (apt-get install redis-server)")
    return binary


class RedisServer:
    """One redis-server; `args` are more `--name value` options (e.g. "--requirepass", "pw")."""

    def __init__(self, work_dir: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(work_dir) / f"redis-{self.port}"
        self.args = args
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        """Start the server (again, after `kill`/`stop`: same port, empty) and wait until it answers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", *self.args]
        with open(self.dir / "redis.log", "ab") as log:
            self.process = children.start(argv, log=log)
        self._wait_until_up()
        return self

    def _wait_until_up(self) -> None:
        """Until the server answers PING: with PONG, or asking for a login."""
        deadline_s = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(64)[:1] in (b"+", b"-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline_s:
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.05)

    def client(self, **options) -> redis.Redis:
        return redis.Redis(port=self.port, **options)

    def kill(self) -> None:
        """Die at once, as a crash would."""
        if self.process is not None:
            children.kill(self.process)

    def stop(self) -> None:
        if self.process is not None:
            children.stop(self.process, wait_s=10)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisClusterServers:
    """`num_nodes` primaries, no replicas; the survivors keep serving their slots when one dies."""

    def __init__(self, work_dir: Path, num_nodes: int = 3) -> None:
        cluster_args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000", "--cluster-require-full-coverage", "no")
        self.nodes = [RedisServer(work_dir, *cluster_args) for _ in range(num_nodes)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> "RedisClusterServers":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(node.address for node in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        deadline_s = time.monotonic() + START_TIMEOUT_S * 3
        while not all(node.client().cluster("info")["cluster_state"] == "ok" for node in self.nodes):
            if time.monotonic() > deadline_s:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "RedisClusterServers":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
