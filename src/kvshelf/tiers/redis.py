"""The redis tier: framed chunks in a shared Redis, or spread over a Redis Cluster.

Keys are `<prefix>:<namespace id>:<key hex>`; `<prefix>:<namespace id>:namespace` holds what
the namespace means (for `kvshelf inspect`). A namespace covers model, layout, adapter and
tenant, so several models and tenants share one Redis safely. Values are framed chunks, so
a value that is damaged, truncated or copied to another key is caught by the tier stack.

Every batch is pipelined: one round trip per Redis node for `contains_prefix`, `get_many`
and `put_many`. In a cluster, keys spread over the nodes by hash slot and each node's share
of a batch goes out as one pipeline, all nodes at once. A node that fails or times out is
skipped for a back-off period and its keys read as misses, while the other nodes keep
serving (run the cluster with `cluster-require-full-coverage no`, or with replicas, so
that the surviving nodes keep answering). Only when every node of a batch fails does the
tier raise TierUnavailable, which makes the tier stack skip the whole tier for a while.
Redis evicting a chunk (maxmemory with an allkeys-* policy) is a miss like any other:
the usable prefix ends there.

Chunks written are reported stored (KV cache events). Redis evicting or expiring a key (ttl_s)
cannot be observed per key, so it is never reported removed; the Redis is shared by the fleet in
any case, so routers must not count it as one instance's (`kvshelf proxy` does not). A reset of
one instance (`Shelf.clear`) drops only its model's namespaces here (`clear_model`).
"""

import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, AuthenticationError, MovedError, OutOfMemoryError, RedisError, ResponseError
from redis.retry import Retry

from kvshelf.config import RedisConfig
from kvshelf.errors import TierUnavailable
from kvshelf.keys import NAMESPACE_ID_CHARS, ChunkKey
from kvshelf.threads import unpin_thread
from kvshelf.tiers.arena import fresh_buffer
from kvshelf.tiers.base import Parts, Tier
from kvshelf.tiers.redis_wire import read_values, send_commands

logger = logging.getLogger(__name__)

NAMESPACE_FIELD = "namespace"
# What makes two namespaces one model's on one rank: all but the tenant salt and the LoRA adapter.
MODEL_FIELDS = ("model_id", "layout", "tp_rank", "tp_size", "extra")
USAGE_REFRESH_S = 1.0
SCAN_BATCH = 512
_CHUNK_NAME_ID = re.compile(f"[0-9a-f]{{{NAMESPACE_ID_CHARS}}}")
_CHUNK_NAME_KEY = re.compile("[0-9a-f]{64}")  # a 32-byte digest in hex
# A Redis that restarted leaves dead pooled connections: retry once, at once, on a fresh one.
_RETRY_ONCE = Retry(NoBackoff(), 1)


def display_url(url: str) -> str:
    """`url` without its user and password, for messages and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


@contextmanager
def _redis_errors_as_unavailable(where: str) -> Iterator[None]:
    """The one place redis-py errors become TierUnavailable (with what to do about it)."""
    try:
        yield
    except (AuthenticationError, ResponseError) as exc:
        if isinstance(exc, AuthenticationError) or str(exc).startswith(("NOAUTH", "WRONGPASS")):
            raise TierUnavailable(
                f"Redis at {where} refused the login ({exc}); set or check redis.password "
                "(KVSHELF_REDIS_PASSWORD) and redis.username, or the user:password in redis.url"
            ) from exc
        raise TierUnavailable(f"Redis at {where} failed: {exc}") from exc
    except (RedisError, OSError) as exc:
        raise TierUnavailable(
            f"cannot reach Redis at {where} ({exc}); check redis.url and that the server runs"
        ) from exc


@dataclass(slots=True, eq=False)  # hashed by identity: nodes key the batch groups
class _Node:
    """One Redis server and its back-off; in a cluster, one primary."""

    name: str  # host:port
    client: redis.Redis
    down_until_s: float = 0.0


class RedisTier(Tier[bytes]):
    name = "redis"
    shared = True
    read_group_chunks = 2  # a pipeline of two chunks: round trips amortized, verification overlapped

    def __init__(self, config: RedisConfig, backoff_s: float) -> None:
        super().__init__(capacity_bytes=0)  # Redis's maxmemory, read by connect(); 0 = no limit
        self.config = config
        self.where = ", ".join(display_url(url) for url in config.urls)
        self._prefix = config.key_prefix
        self._ttl_ms = int(config.ttl_s * 1000) if config.ttl_s else None
        self._backoff_s = backoff_s
        self._lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._nodes: dict[str, _Node] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._noted_namespace_ids: set[str] = set()
        self._usage_read_s = 0.0
        self._last_evicted_keys: int | None = None

    # -- connecting ------------------------------------------------------------------------

    def connect(self) -> None:
        """Reach every node (and, in a cluster, learn the slot map); raises TierUnavailable."""
        with self._lock:
            if self._nodes:
                return
            with _redis_errors_as_unavailable(self.where):
                nodes = self._connect_cluster() if self.config.cluster else self._connect_single()
            self._nodes = {node.name: node for node in nodes}
            failures = [outcome for outcome in self._per_node(redis.Redis.ping) if _failed(outcome)]
            if len(failures) == len(nodes):
                self.close()
                raise failures[0]
            for failure in failures:  # a cluster missing some nodes still serves the others' keys
                logger.warning("kvshelf: %s", failure)
            if len(nodes) > 1:
                self._pool = ThreadPoolExecutor(len(nodes), thread_name_prefix="kvshelf-redis",
                                                initializer=unpin_thread)
        self.refresh_usage(force=True)

    def _url(self, url: str) -> str:
        """`url` with redis.username / redis.password in place of its own, where they are set."""
        parts = urlsplit(url)
        # The URL's own login is %-escaped; decoded here, so it is escaped once below, like the config's.
        username = self.config.username if self.config.username is not None else _unquoted(parts.username)
        password = self.config.password if self.config.password is not None else _unquoted(parts.password)
        login = quote(username or "", safe="") + (f":{quote(password, safe='')}" if password is not None else "")
        host = f"{parts.hostname}:{parts.port or 6379}"
        return parts._replace(netloc=f"{login}@{host}" if login else host).geturl()

    def _connect_single(self) -> list[_Node]:
        client = redis.Redis.from_url(self._url(self.config.urls[0]), retry=_RETRY_ONCE, **self._timeouts())
        return [_Node(urlsplit(display_url(self.config.urls[0])).netloc, client)]

    def _connect_cluster(self) -> list[_Node]:
        # TLS, login and options come from the first URL; the others only add seed nodes.
        seeds = [urlsplit(url) for url in self.config.urls[1:]]
        self._cluster = RedisCluster(
            url=self._url(self.config.urls[0]),
            startup_nodes=[ClusterNode(seed.hostname, seed.port or 6379) for seed in seeds],
            require_full_coverage=False,  # a cluster missing a node still serves the other nodes' keys
            **self._timeouts(),
        )
        return [self._node(primary) for primary in self._cluster.get_primaries()]

    def _timeouts(self) -> dict[str, Any]:
        return {"socket_connect_timeout": self.config.connect_timeout_s, "socket_timeout": self.config.timeout_s}

    def _node(self, cluster_node: ClusterNode) -> _Node:
        node = self._nodes.get(cluster_node.name)
        if node is None:
            node = _Node(cluster_node.name, self._cluster.get_redis_connection(cluster_node))
        return node

    def _node_of(self, name: bytes) -> _Node | None:
        """The node that holds `name`; None if no node covers its slot."""
        if self._cluster is None:
            return next(iter(self._nodes.values()))
        try:
            node = self._node(self._cluster.get_node_from_key(name))
        except RedisError:
            return None
        self._nodes.setdefault(node.name, node)
        return node

    # -- batched commands --------------------------------------------------------------------

    def _batch(self, names: Sequence[bytes], add_command: Callable[[Any, int], None]) -> list[Any]:
        """Run one command per name, one pipeline per node, nodes in parallel.

        `add_command(pipeline, i)` queues the command for `names[i]`. Results are in name order;
        a name whose node failed or is backing off gets None. Raises TierUnavailable only when
        no node of the batch answered.
        """

        def pipelined(client: redis.Redis, indices: list[int]) -> list[Any]:
            pipeline = client.pipeline(transaction=False)
            for index in indices:
                add_command(pipeline, index)
            return pipeline.execute(raise_on_error=False)

        return self._per_node_batch(names, pipelined)

    def _per_node_batch(self, names: Sequence[bytes], send: Callable[[redis.Redis, list[int]], list[Any]]) -> list[Any]:
        """`send(client, indices)` on each node for the names it holds; see `_batch`."""
        self.connect()
        results: list[Any] = [None] * len(names)
        groups: defaultdict[_Node, list[int]] = defaultdict(list)
        for index, name in enumerate(names):
            node = self._node_of(name)
            if node is not None:
                groups[node].append(index)
        if not groups:
            return results

        def run(node: _Node, indices: list[int]) -> list[Any] | TierUnavailable:
            return self._call(node, lambda client: send(client, indices))

        if self._pool is None or len(groups) == 1:
            outcomes = [run(node, indices) for node, indices in groups.items()]
        else:
            outcomes = list(self._pool.map(run, groups.keys(), groups.values()))
        failures = [outcome for outcome in outcomes if _failed(outcome)]
        if len(failures) == len(groups):
            raise failures[0]
        for failure in failures:
            self.counters.num_errors += 1
            logger.warning("kvshelf: %s; its keys read as misses for %.1f s", failure, self._backoff_s)
        error_replies = []
        for (node, indices), outcome in zip(groups.items(), outcomes):
            for index, reply in zip(indices, [] if _failed(outcome) else outcome):
                if isinstance(reply, ResponseError):  # this key counts as missing
                    error_replies.append((node, reply))
                else:
                    results[index] = reply
        if error_replies:
            self._note_error_replies(error_replies)
        return results

    def _note_error_replies(self, error_replies: list[tuple[_Node, ResponseError]]) -> None:
        moved = [reply for _, reply in error_replies if isinstance(reply, (AskError, MovedError))]
        full = [reply for _, reply in error_replies if isinstance(reply, OutOfMemoryError)]
        self.counters.num_rejected_writes += len(full)  # Redis is full and set not to evict
        if moved and self._cluster is not None:
            self._reload_slot_map()
        others = [(node, reply) for node, reply in error_replies if not isinstance(reply, (AskError, MovedError))]
        if others:
            node, reply = others[0]
            logger.warning("kvshelf: Redis node %s refused %d commands: %s", node.name, len(others), reply)

    def _reload_slot_map(self) -> None:
        """Slots moved (resharding, failover): learn where they are now; their keys missed this time."""
        try:
            with _redis_errors_as_unavailable(self.where):
                self._cluster.nodes_manager.initialize()
        except TierUnavailable as exc:
            logger.warning("kvshelf: could not reload the cluster's slot map: %s", exc)

    def _call(self, node: _Node, operation: Callable[[redis.Redis], Any]) -> Any:
        """`operation(client)` on one node; a failure is returned, not raised, and backs the node off."""
        if time.monotonic() < node.down_until_s:
            return TierUnavailable(f"Redis node {node.name} is backing off after a failure")
        try:
            with _redis_errors_as_unavailable(node.name):
                return operation(node.client)
        except TierUnavailable as exc:
            node.down_until_s = time.monotonic() + self._backoff_s
            return exc

    def _per_node(self, operation: Callable[[redis.Redis], Any]) -> list[Any]:
        """`operation(client)` on every node in turn: its answer, or a TierUnavailable."""
        return [self._call(node, operation) for node in list(self._nodes.values())]

    def _name(self, key: ChunkKey) -> bytes:
        return f"{self._prefix}:{key.namespace_id}:{key.hex}".encode()

    # -- the tier interface ---------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        held = self.contains_each(keys)
        return held.index(False) if False in held else len(held)

    def contains_each(self, keys: Sequence[ChunkKey]) -> list[bool]:
        names = [self._name(key) for key in keys]
        return [bool(reply) for reply in self._batch(names, lambda pipe, i: pipe.exists(names[i]))]

    def get_many(
        self, keys: Sequence[ChunkKey], into: Callable[[int], memoryview] | None = None
    ) -> list[memoryview | None]:
        """Each value is read from the socket into `into(its length)` (the memory tier's arena), or
        into fresh memory."""
        names = [self._name(key) for key in keys]
        # GETEX reads and renews the expiry in one command: chunks in use do not expire.
        ttl_args = [b"PX", str(self._ttl_ms).encode()] if self._ttl_ms else []
        command = b"GETEX" if ttl_args else b"GET"

        def send_gets(client: redis.Redis, indices: list[int]) -> list[Any]:
            return read_values(client, [[command, names[i], *ttl_args] for i in indices], into or fresh_buffer)

        return self._per_node_batch(names, send_gets)

    def put_many(self, items: Sequence[tuple[ChunkKey, Parts]]) -> None:
        names = [self._name(key) for key, _ in items]
        ttl_args = [b"PX", str(self._ttl_ms).encode()] if self._ttl_ms else []

        def send_sets(client: redis.Redis, indices: list[int]) -> list[Any]:
            return send_commands(client, [[b"SET", names[i], items[i][1], *ttl_args] for i in indices])

        replies = self._per_node_batch(names, send_sets)
        self._note_stored([key for (key, _), reply in zip(items, replies) if reply is not None])

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        names = [self._name(key) for key in keys]
        self._batch(names, lambda pipe, i: pipe.unlink(names[i]))

    def note_namespace(self, namespace_id: str, description: dict) -> None:
        if namespace_id in self._noted_namespace_ids:
            return
        name = f"{self._prefix}:{namespace_id}:{NAMESPACE_FIELD}".encode()
        text = json.dumps(description, indent=2, sort_keys=True)
        self._batch([name], lambda pipe, i: pipe.set(name, text, nx=True))
        self._noted_namespace_ids.add(namespace_id)

    def refresh_usage(self, force: bool = False) -> None:
        """Redis's own used and maximum memory and evicted keys, summed over nodes; at most once a second."""
        now_s = time.monotonic()
        if not force and now_s - self._usage_read_s < USAGE_REFRESH_S:
            return
        self._usage_read_s = now_s
        infos = self._per_node(self._info)
        if any(_failed(info) for info in infos):
            return
        self._used_bytes = sum(info.get("used_memory", 0) for info in infos)
        self._capacity_bytes = sum(info.get("maxmemory", 0) for info in infos)
        # Redis counts every key it evicted since it started (all of its keys, not only ours).
        evicted_keys = sum(info.get("evicted_keys", 0) for info in infos)
        if self._last_evicted_keys is not None:
            restarted = evicted_keys < self._last_evicted_keys
            self.counters.num_evictions += evicted_keys if restarted else evicted_keys - self._last_evicted_keys
        self._last_evicted_keys = evicted_keys

    @staticmethod
    def _info(client: redis.Redis) -> dict:
        return client.execute_command("INFO", "server", "memory", "stats")

    # -- for tools: list, read and clear what is stored -------------------------------------------

    def iter_names(self, namespace_id: str | None = None) -> Iterator[tuple[str, ChunkKey | None]]:
        """Every stored name under the prefix (or one namespace), with its chunk key (None if not a chunk).

        Anyone who can write to the Redis can store any bytes under the prefix: a name that is not
        UTF-8 (kvshelf never writes one) comes out printable, its odd bytes as \\xNN, and not a chunk's.
        """
        for raw_name in self._scan(namespace_id):
            try:
                name = raw_name.decode()
            except UnicodeDecodeError:
                yield raw_name.decode(errors="backslashreplace"), None
                continue
            yield name, self.key_of(name)

    def _scan(self, namespace_id: str | None, field: str = "*") -> Iterator[bytes]:
        """Every stored name under the prefix (or one namespace; or one `field` of each), as Redis holds it."""
        self.connect()
        pattern = f"{self._prefix}:{namespace_id or '*'}:{field}"
        for node in list(self._nodes.values()):
            with _redis_errors_as_unavailable(node.name):
                yield from node.client.scan_iter(match=pattern, count=SCAN_BATCH)

    def key_of(self, name: str) -> ChunkKey | None:
        """The chunk key of a name as `_name` writes it; None for anything else (descriptions, strays)."""
        parts = name.split(":")
        if len(parts) != 3 or parts[0] != self._prefix:
            return None
        namespace_id, key_hex = parts[1:]
        # Exactly the digits `_name` writes: a name in another spelling is not the chunk's.
        if not _CHUNK_NAME_ID.fullmatch(namespace_id) or not _CHUNK_NAME_KEY.fullmatch(key_hex):
            return None
        return ChunkKey(namespace_id, bytes.fromhex(key_hex))

    def sizes(self, names: Sequence[str]) -> list[int]:
        raw = [name.encode() for name in names]
        return [reply or 0 for reply in self._batch(raw, lambda pipe, i: pipe.strlen(raw[i]))]

    def read(self, names: Sequence[str]) -> list[bytes | None]:
        raw = [name.encode() for name in names]
        return self._batch(raw, lambda pipe, i: pipe.get(raw[i]))

    def namespace_description(self, namespace_id: str) -> dict | None:
        (text,) = self.read([f"{self._prefix}:{namespace_id}:{NAMESPACE_FIELD}"])
        try:
            return json.loads(text) if text is not None else None
        except ValueError:
            return None

    def clear(self, namespace_id: str) -> int:
        """Remove one namespace's chunks and description; returns how many names were removed."""
        names = list(self._scan(namespace_id))  # as Redis holds them: not every name is UTF-8
        for start in range(0, len(names), SCAN_BATCH):
            batch = names[start : start + SCAN_BATCH]
            self._batch(batch, lambda pipe, i, batch=batch: pipe.unlink(batch[i]))
        self._note_removed([key for name in names if (key := self.key_of(name.decode(errors="replace")))])
        return len(names)

    def clear_model(self, description: dict, namespace_ids: Sequence[str] = ()) -> None:
        """Remove one model's namespaces: those recorded with a description that agrees with
        `description` (a public description) on MODEL_FIELDS, whatever their tenant salt and adapter,
        and `namespace_ids` (the caller's own, whose description Redis may have evicted)."""
        matching = set(namespace_ids)
        names = list(self._scan(None, NAMESPACE_FIELD))
        for start in range(0, len(names), SCAN_BATCH):
            batch = names[start : start + SCAN_BATCH]
            for name, text in zip(batch, self._batch(batch, lambda pipe, i, batch=batch: pipe.get(batch[i]))):
                namespace_id = name.decode(errors="replace").split(":")[-2]
                if _CHUNK_NAME_ID.fullmatch(namespace_id) and _same_model(text, description):
                    matching.add(namespace_id)
        for namespace_id in sorted(matching):
            self.clear(namespace_id)

    def server_info(self) -> list[dict]:
        """Per node: memory in use, maxmemory and its policy, keys Redis evicted."""
        fields = ("redis_version", "used_memory", "maxmemory", "maxmemory_policy", "evicted_keys")

        infos = []
        for node, info in zip(list(self._nodes.values()), self._per_node(self._info)):
            answer = {"error": str(info)} if _failed(info) else {field: info.get(field) for field in fields}
            infos.append({"node": node.name} | answer)
        return infos

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for node in self._nodes.values():
            node.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._nodes, self._cluster, self._pool = {}, None, None


def _same_model(text: bytes | None, description: dict) -> bool:
    """Whether a recorded namespace description (JSON) agrees with `description` on MODEL_FIELDS."""
    try:
        recorded = json.loads(text) if text is not None else None
    except ValueError:
        return False
    return isinstance(recorded, dict) and all(recorded.get(name) == description.get(name) for name in MODEL_FIELDS)


def _unquoted(text: str | None) -> str | None:
    return unquote(text) if text is not None else None


def _failed(outcome: Any) -> bool:
    return isinstance(outcome, TierUnavailable)

