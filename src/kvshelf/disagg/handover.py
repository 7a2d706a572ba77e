"""The prefill/decode hand-over, behind one object: how a prompt's KV leaves a prefill instance
(pushed to the decode instance's inbox, or written through to the shared tiers) and how a decode
instance receives it (an inbox filled by a `KVReceiver`)."""

import logging
from collections.abc import Sequence

import torch

from kvshelf.disagg.transfer import KVPusher, KVReceiver, TransferCounters
from kvshelf.keys import Prompt
from kvshelf.ports import QuietLog
from kvshelf.shelf import Shelf

logger = logging.getLogger(__name__)


class HandOver:
    def __init__(self, shelf: Shelf, counters: TransferCounters) -> None:
        self._shelf = shelf
        self.counters = counters
        self._pusher = KVPusher(shelf.config.pd.push_timeout_s, counters, shelf.keyring)
        self._receiver: KVReceiver | None = None
        self._log = QuietLog(logger)

    def send(self, prompt: Prompt, chunks: Sequence[torch.Tensor], push_to: str | None) -> None:
        """Hand the whole prompt's chunks (`chunks`, its tail included) over and store them: pushed
        to `push_to` first, then stored here and in the shared tiers; without a push_to, or when the
        push fails, written through to the shared tiers before this returns (the decode instance
        looks there). The push goes first as the decode instance is waiting for it, and so that a
        healthy push lands before the write-through, which would otherwise win the race for the
        decode instance's load and leave the push wasted."""
        pushed = push_to is not None and self._push(prompt, chunks, push_to)
        self._shelf.save_chunks(prompt.token_ids, prompt.namespace, chunks.__getitem__, 0, prompt.mm_hashes,
                                tail=True, admit=False)  # the decode instance needs all of it
        if not pushed:
            self._shelf.flush()

    def _push(self, prompt: Prompt, chunks: Sequence[torch.Tensor], push_to: str) -> bool:
        try:
            keys = self._shelf.chunk_keys(prompt.token_ids, prompt.namespace, prompt.mm_hashes, tail=True)
            return self._pusher.push(push_to, keys, chunks.__getitem__, prompt.namespace.layout)
        except Exception as exc:  # noqa: BLE001 - the pusher contains its own failures; this is for the rest
            self._log.warning("push", "kvshelf: pushing KV to %s failed (%s: %s); handing it over through the "
                              "shared tiers", push_to, type(exc).__name__, exc)
            self.counters.push_failures += 1
            return False

    def receive(self, bytes_per_token: int) -> KVReceiver | None:
        """Decode side: accept pushed KV on pd.receive_address into the shelf's inbox (None without one).
        `bytes_per_token` of the namespace's layout bounds the frames accepted."""
        if self._shelf.inbox is None:
            return None
        chunk_bytes = bytes_per_token * self._shelf.chunk_size
        self._receiver = KVReceiver(self._shelf.inbox, self._shelf.config.pd.receive_address, self._shelf.held_nearby,
                                    self.counters, self._shelf.keyring, chunk_bytes)
        return self._receiver

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
        self._pusher.close()
