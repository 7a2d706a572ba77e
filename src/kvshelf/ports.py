"""What every kvshelf ZeroMQ port shares: CURVE authentication, message bounds, quiet logging;
and free loopback ports for the servers that launchers and tests start (`free_port`).

kvshelf listens on two TCP ports that other machines reach: a decode instance's push receiver
(`pd.receive_address`) and an instance's routing lookup (`lookup_address`, asked by `kvshelf
proxy`). With a keyed deployment (a `security.key`, its key file, or the default key file) both
are ZeroMQ CURVE servers: every holder of the secret derives the same server and client key
pairs (`Keyring.curve_keys`), the wire is encrypted, and a ZAP handler admits only peers that
present the derived client key. A peer without the secret completes no handshake: no message of
its is delivered and it gets no answer. With `security.key: none` the ports are open, as
ZeroMQ's NULL mechanism is: anyone who reaches them may ask and push, so keep them on loopback
or a private network then.

ZeroMQ allows one ZAP handler per context (the inproc://zeromq.zap.01 endpoint), and a worker
process's lookup server and receiver share one context (`zmq_context`); so one authenticator is
started per context, and each server socket gets a ZAP domain of its own, naming the one client
key it admits.

Bounds: `zmq.MAXMSGSIZE` applies to each frame of a message: a peer declaring a larger frame is
disconnected before its bytes are read or buffered. `zmq.RCVHWM` caps the messages queued per peer.
"""

import logging
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kvshelf.security import Keyring
from kvshelf.threads import unpin_thread, usable_cpus

LOG_PERIOD_S = 10.0  # a port logs one line per reason at most this often
_PUSH_TO_CONTEXT = b"push_to\0"
CLUSTER_BUS_OFFSET = 10000  # a redis cluster node also listens on port + 10000
_TCP_ADDRESS = re.compile(r"tcp://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")

_authenticators: dict[int, ThreadAuthenticator] = {}  # by the libzmq context's address
_context: zmq.Context | None = None
_lock = threading.Lock()
_handed_out: set[int] = set()  # by free_port, with their bus ports


def zmq_context() -> zmq.Context:
    """The ZeroMQ context of every kvshelf socket in this process. Its I/O threads, which move,
    encrypt and decrypt every message, may run on every usable core: started from a thread that
    vLLM pinned, they would inherit its one core (see `kvshelf.threads`), where they sat behind a
    spinning worker: a 27 MB push took 1-3 s, not 0.15 s."""
    global _context
    with _lock:
        if _context is None:
            context = zmq.Context()
            for cpu in sorted(usable_cpus()):  # applies to I/O threads started later: before any socket
                context.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)
            _context = context
        return _context


class _OneClientKey:
    """A ZAP credentials provider admitting exactly one client public key (Z85)."""

    def __init__(self, public_key: bytes) -> None:
        self._public_key = public_key

    def callback(self, domain: str, client_key: bytes) -> bool:
        return client_key == self._public_key


def _authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """The one ZAP handler of `context`, started on first use (unpinned, as it answers every
    handshake); it lives as long as the process."""
    with _lock:
        authenticator = _authenticators.get(context.underlying)
        if authenticator is None:
            authenticator = ThreadAuthenticator(zmq.Context.shadow(context.underlying))
            authenticator.start()
            unpin_thread(authenticator.thread.native_id)
            _authenticators[context.underlying] = authenticator
        return authenticator


def secure_server(socket: zmq.Socket, keyring: Keyring, max_frame_bytes: int, receive_hwm: int) -> None:
    """Bound `socket`'s frames and queue, and with a keyed `keyring` make it a CURVE server that
    admits only holders of the secret. Call before `bind`."""
    socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    socket.setsockopt(zmq.RCVHWM, receive_hwm)
    server_keys = keyring.curve_keys("server")
    if server_keys is None:  # security.key: none: an open port
        return
    server_public, server_secret = server_keys
    client_public, _ = keyring.curve_keys("client")
    # The domain names this secret's server key, so servers of two deployments in one process
    # (tests, or two shelves) each admit their own clients only.
    domain = "kvshelf-" + server_public.decode()
    _authenticator(socket.context).configure_curve_callback(domain, _OneClientKey(client_public))
    socket.setsockopt_string(zmq.ZAP_DOMAIN, domain)
    socket.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
    socket.setsockopt(zmq.CURVE_SERVER, 1)


def secure_client(socket: zmq.Socket, keyring: Keyring) -> None:
    """With a keyed `keyring`, present the deployment's client keys to its CURVE servers. Call before `connect`."""
    server_keys = keyring.curve_keys("server")
    if server_keys is None:
        return
    client_public, client_secret = keyring.curve_keys("client")
    socket.setsockopt(zmq.CURVE_SERVERKEY, server_keys[0])
    socket.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, client_secret)


def is_tcp_address(address: object) -> bool:
    """Whether `address` is tcp://host:port exactly (no wildcard, interface or source address)."""
    match = _TCP_ADDRESS.fullmatch(address) if isinstance(address, str) else None
    return match is not None and 0 < int(match.group(1)) < 65536


def sign_push_to(keyring: Keyring, address: str) -> str:
    """The proxy's signature of a push destination it hands a prefill instance ('' unkeyed)."""
    return keyring.sign(_PUSH_TO_CONTEXT + address.encode())


def push_to_is_signed(keyring: Keyring, address: str, signature: object) -> bool:
    return keyring.verify(_PUSH_TO_CONTEXT + address.encode(), signature)


class QuietLog:
    """Warnings of a port that strangers can provoke: at most one line per reason per `period_s`,
    the next one saying how many were left out; never a traceback."""

    def __init__(self, logger: logging.Logger, period_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._period_s = LOG_PERIOD_S if period_s is None else period_s
        self._clock = clock
        self._last_s: dict[str, float] = {}
        self._left_out: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, reason: str, message: str, *args: object) -> None:
        now_s = self._clock()
        with self._lock:
            last_s = self._last_s.get(reason)
            if last_s is not None and now_s - last_s < self._period_s:
                self._left_out[reason] += 1
                return
            self._last_s[reason] = now_s
            left_out = self._left_out.pop(reason, 0)
        if left_out:
            message += f" ({left_out} more like it since the last such line, not logged)"
        self._logger.warning(message, *args)


def free_port() -> int:
    """A free loopback port for a server that a launcher or a test starts; port + 10000 is free too,
    so a redis cluster node may take it (its bus listens there). A port is free when probed, and
    stays free only until its server binds it: so this process never hands out a port (or a bus
    port) twice, or two servers started together, as `kvshelf pd`'s instances are, could be given
    the same one and one of them would answer on the other's port."""
    with _lock:
        for _ in range(1000):
            port = random.randint(20000, 50000)
            wanted = {port, port + CLUSTER_BUS_OFFSET}
            if not wanted & _handed_out and all(_port_is_free(each) for each in wanted):
                _handed_out.update(wanted)
                return port
    raise RuntimeError("no free loopback port found in 20000-60000; stop servers left running there")


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
