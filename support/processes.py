"""Real processes for tests and benchmarks: ``redis-server`` on a free port, a 3-master Redis Cluster,
a master with a replica watched by Sentinel."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RedisCluster", "RedisSentinelSetup", "RedisServer", "free_cluster_port", "free_port", "wait_for_port"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """A throw-away ``redis-server`` (no persistence) that tests may stop and start on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), *self.extra]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # a node still starting answers with anything
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout}s")


class RedisCluster:
    """``masters`` ``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create``.

    ``cluster-require-full-coverage no``: when a master dies, the others keep serving their slots.
    ``password`` sets ``requirepass`` (and ``masterauth``) on every node.
    """

    def __init__(self, workdir: Path, masters: int = 3, *, password: str = "", node_timeout_ms: int = 1000) -> None:
        self.workdir = workdir
        self.password = password
        self.nodes: list[RedisServer] = []
        for _ in range(masters):
            port = free_cluster_port()
            extra = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no",
            ]  # fmt: skip
            if password:
                extra += ["--requirepass", password, "--masterauth", password]
            self.nodes.append(RedisServer(workdir / str(port), port, *extra))

    @property
    def url(self) -> str:
        """Any one node: the client finds the others."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        args = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes)]
        args += ["--cluster-replicas", "0", "--cluster-yes"]
        if self.password:
            args += ["-a", self.password, "--no-auth-warning"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        for node in self.nodes:
            _wait(lambda node=node: self._state(node) == "ok", 20, f"cluster node {node.port} not ok")

    def _state(self, node: RedisServer) -> str:
        info = self.node_client(node).execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        return str(info["cluster_state"])

    def node_client(self, node: RedisServer) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=node.port, password=self.password or None)

    def client(self) -> Any:
        import redis.cluster

        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, password=self.password or None)

    def node_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot now."""
        client = self.client()
        try:
            node = client.get_node_from_key(key)
            return next(server for server in self.nodes if server.port == int(node.port))
        finally:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelSetup:
    """A master, a replica of it, and ``sentinels`` ``redis-server --sentinel`` watching them as
    ``master_name``, quick to fail over (down after ``down_after_ms``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        master_name: str = "gateway",
        sentinels: int = 1,
        password: str = "",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.workdir = workdir
        self.master_name = master_name
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.master = RedisServer(workdir / "master", None, *auth)
        self.replica = RedisServer(workdir / "replica", None, *auth, "--replicaof", "127.0.0.1", str(self.master.port))
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_processes: list[subprocess.Popen[bytes]] = []

    def url(self, *extra_sentinel_ports: int) -> str:
        """``redis://[:password@]host:port,host:port/0`` listing the sentinels (and ``extra`` ones first)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{port}" for port in (*extra_sentinel_ports, *self.sentinel_ports))
        return f"redis://{auth}{hosts}/0"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        _wait(self._replica_in_sync, 20, "the replica did not sync with the master")
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            folder = self.workdir / f"sentinel-{port}"
            folder.mkdir(parents=True, exist_ok=True)
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {folder}",
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} {quorum}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
            ]
            if self.password:
                lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
            config = folder / "sentinel.conf"
            config.write_text("\n".join(lines) + "\n")
            process = subprocess.Popen(
                ["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.sentinel_processes.append(process)
            wait_for_port(port)
        _wait(lambda: self.master_port() == self.master.port, 20, "the sentinels do not name the master")
        _wait(self._replica_known, 20, "the sentinels do not know the replica")

    def _client(self, server: RedisServer) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=server.port, password=self.password or None)

    def _replica_in_sync(self) -> bool:
        info = self._client(self.replica).info("replication")
        return bool(info.get("master_link_status") == "up")

    def _replica_known(self) -> bool:
        import redis

        sentinel = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0])
        replicas = sentinel.execute_command("SENTINEL", "REPLICAS", self.master_name)
        return len(replicas) >= 1

    def master_port(self) -> int:
        """The master's port as the first sentinel names it now."""
        import redis

        sentinel = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0])
        _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        return int(port)

    def wait_for_failover(self, timeout: float = 30.0) -> None:
        """Until the sentinels name the replica as master and it accepts writes."""
        _wait(lambda: self.master_port() == self.replica.port, timeout, "the sentinels did not promote the replica")
        _wait(
            lambda: self._client(self.replica).info("replication")["role"] == "master",
            timeout,
            "the replica did not become a master",
        )

    def stop(self) -> None:
        for process in self.sentinel_processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self.sentinel_processes = []
        self.replica.stop()
        self.master.stop()
