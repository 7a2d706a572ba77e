"""Pipelined Redis commands whose large arguments go to the socket where they lie.

redis-py would copy each value twice (to bytes, then into the packed command): several MB per
chunk. Here the RESP framing is built around the value's parts instead.
"""

from typing import Any

import redis
from redis.exceptions import ResponseError

from kvshelf.tiers.base import Parts, parts_bytes

SMALL_PART_BYTES = 64 * 2**10  # parts below this are copied into the command; larger ones are sent in place


def send_commands(client: redis.Redis, commands: list[list[bytes | Parts]]) -> list[Any]:
    """Replies to `commands` (an error reply as its ResponseError), sent as one pipeline.

    A dead pooled connection (the server restarted) is retried once on a fresh one; every
    command sent here may safely run twice.
    """
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
    for attempt in range(2):
        connection = client.connection_pool.get_connection()
        try:
            connection.send_packed_command(packed)
            return [_read_reply(connection) for _ in commands]
        except (redis.ConnectionError, redis.TimeoutError):
            connection.disconnect()
            if attempt:
                raise
        finally:
            client.connection_pool.release(connection)
    raise AssertionError("not reached")


def _read_reply(connection: Any) -> Any:
    try:
        return connection.read_response()
    except ResponseError as exc:  # an error reply (OOM, MOVED): the next replies follow as usual
        return exc
