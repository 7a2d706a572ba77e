"""Pipelined Redis commands whose large arguments and replies go between the socket and where they lie.

redis-py would copy each value twice (to bytes, then into the packed command): several MB per
chunk. Here the RESP framing is built around the value's parts instead. Replies are read the same
way in reverse: redis-py (and hiredis) would make a fresh bytes object of each value, freshly
faulted memory that is then decoded and copied again; `read_values` reads each value straight from
the socket into a buffer its caller gives (the memory tier's arena).
"""

import socket
from collections.abc import Callable
from typing import Any

import redis
from redis._parsers import BaseParser
from redis.exceptions import InvalidResponse, ResponseError

from kvshelf.tiers.base import Parts, parts_bytes

SMALL_PART_BYTES = 64 * 2**10  # parts below this are copied into the command; larger ones are sent in place
LINE_BUFFER_BYTES = 64 * 2**10  # reply lines (and a value's first bytes) are read through this; none is longer


def send_commands(client: redis.Redis, commands: list[list[bytes | Parts]]) -> list[Any]:
    """Replies to `commands` (an error reply as its ResponseError), sent as one pipeline.

    A dead pooled connection (the server restarted) is retried once on a fresh one; every
    command sent here may safely run twice.
    """
    return _pipeline(client, _packed(commands), lambda connection: [_read_reply(connection) for _ in commands])


def read_values(
    client: redis.Redis, commands: list[list[bytes]], into: Callable[[int], memoryview]
) -> list[memoryview | ResponseError | None]:
    """Replies to `commands` (each answers a bulk string: GET, GETEX), sent as one pipeline: each
    value read into `into(its length)`, None for a missing key, an error reply as its ResponseError.
    Retried once like `send_commands`."""
    return _pipeline(client, _packed(commands), lambda connection: _Replies(connection).values(len(commands), into))


def _packed(commands: list[list[bytes | Parts]]) -> list[bytes | memoryview]:
    packed: list[bytes | memoryview] = []
    for command in commands:
        head = b"*%d\r\n" % len(command)
        for argument in command:
            parts = [argument] if isinstance(argument, bytes) else argument
            head += b"$%d\r\n" % parts_bytes(parts)
            for part in parts:
                if memoryview(part).nbytes < SMALL_PART_BYTES:
                    head += part
                else:
                    packed += [head, part]
                    head = b""
            head += b"\r\n"
        packed.append(head)
    return packed


def _pipeline(client: redis.Redis, packed: list[bytes | memoryview], read: Callable[[Any], list[Any]]) -> list[Any]:
    """Send `packed` on a pooled connection and `read(connection)` the replies; on a dead connection,
    once more on a fresh one. A connection that failed mid-reply is dropped, never reused."""
    for attempt in range(2):
        connection = client.connection_pool.get_connection()
        try:
            connection.send_packed_command(packed)
            return read(connection)
        except (redis.ConnectionError, redis.TimeoutError):
            connection.disconnect()
            if attempt:
                raise
        except BaseException:
            connection.disconnect()
            raise
        finally:
            client.connection_pool.release(connection)
    raise AssertionError("not reached")


def _read_reply(connection: Any) -> Any:
    try:
        return connection.read_response()
    except ResponseError as exc:  # an error reply (OOM, MOVED): the next replies follow as usual
        return exc


class _Replies:
    """RESP replies read from a connection's socket: lines through a small buffer, bulk strings
    straight into the buffers they are wanted in.

    redis-py's parser is bypassed, not confused: it holds no bytes of these replies (it reads only
    when asked, and every earlier reply on the connection was read whole), and a connection that
    fails here is dropped.
    """

    def __init__(self, connection: Any) -> None:
        self._sock: socket.socket = connection._sock  # set by send_packed_command
        self._where = f"{getattr(connection, 'host', 'unix')}:{getattr(connection, 'port', 0)}"
        self._buffer = bytearray(LINE_BUFFER_BYTES)
        self._start = self._end = 0

    def values(self, count: int, into: Callable[[int], memoryview]) -> list[memoryview | ResponseError | None]:
        try:
            return [self._value(into) for _ in range(count)]
        except TimeoutError as exc:  # socket.timeout
            raise redis.TimeoutError(f"Timeout reading from {self._where}") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from {self._where}: {exc}") from exc

    def _value(self, into: Callable[[int], memoryview]) -> memoryview | ResponseError | None:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            return BaseParser.parse_error(rest.decode(errors="replace"))
        if kind == b"_":  # RESP3's null
            return None
        if kind != b"$" or not rest.lstrip(b"-").isdigit():
            raise InvalidResponse(f"Redis at {self._where} answered {line[:40]!r} where a value belongs")
        num_bytes = int(rest)
        if num_bytes < 0:
            return None
        value = into(num_bytes)
        self._read_into(value)
        if self._line() != b"":
            raise InvalidResponse(f"Redis at {self._where} sent a value longer than it said ({num_bytes} bytes)")
        return value

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._start, self._end)) < 0:
            if self._end - self._start == len(self._buffer):
                raise InvalidResponse(f"Redis at {self._where} sent a reply line of over {len(self._buffer)} bytes")
            self._fill()
        line = bytes(self._buffer[self._start : end])
        self._start = end + 2
        return line

    def _fill(self) -> None:
        """Read more into the line buffer, moving what is unread to its front first."""
        unread = self._end - self._start
        self._buffer[:unread] = self._buffer[self._start : self._end]
        self._start, self._end = 0, unread
        num_read = self._sock.recv_into(memoryview(self._buffer)[self._end :])
        if not num_read:
            raise redis.ConnectionError(f"Redis at {self._where} closed the connection")
        self._end += num_read

    def _read_into(self, value: memoryview) -> None:
        """Fill `value`: first from what the line buffer holds, the rest straight from the socket."""
        num_done = min(len(value), self._end - self._start)
        value[:num_done] = self._buffer[self._start : self._start + num_done]
        self._start += num_done
        while num_done < len(value):
            num_read = self._sock.recv_into(value[num_done:])
            if not num_read:
                raise redis.ConnectionError(f"Redis at {self._where} closed the connection")
            num_done += num_read
