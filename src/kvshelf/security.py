"""The deployment secret and everything keyed by it.

One secret (`security.key`, `security.key_file`, or `$KVSHELF_HOME/secret.key`, made 0600 on
first use so that every process of one user on one host shares it) is expanded into
independent subkeys, one per purpose:

  chunk keys   each link of a prompt's chained chunk digest is a keyed hash: a store reader
               can neither compute which key a prompt has nor test a guess of its tokens;
  chunk MAC    a GMAC of every stored chunk's payload under a one-time key derived from its key
               digest and header (see `Keyring.tag`): a chunk cannot be forged, altered, or moved
               to another key;
  salt tags    a tenant's cache_salt is stored and printed only as a keyed hash;
  encryption   optional, at rest (disk, redis): AES-256-GCM, which then authenticates the chunk;
  signatures   a push destination the proxy hands an engine in a request;
  CURVE keys   the ZeroMQ lookup and push ports accept only peers holding the secret.

With `security.key: none` nothing is keyed: digests are plain blake3, the chunk tag is an
xxh3-128 checksum (integrity against accidents, not attacks), ports are open.
"""

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
import xxhash
import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvshelf.errors import ConfigError, CorruptChunk

if TYPE_CHECKING:  # config imports the codecs, which import this module
    from kvshelf.config import SecurityConfig

logger = logging.getLogger(__name__)

TAG_BYTES = 32
NONCE_BYTES = 12
GCM_TAG_BYTES = 16
SALT_BYTES = TAG_BYTES - GCM_TAG_BYTES
_CONTEXT = "kvshelf 2026-12 {}"


def _subkey(secret: bytes, purpose: str) -> bytes:
    return blake3.blake3(secret, derive_key_context=_CONTEXT.format(purpose)).digest()


class Keyring:
    """Subkeys of one deployment secret (None: `security.key: none`, nothing keyed)."""

    def __init__(self, secret: bytes | None, encrypt: bool = False) -> None:
        if encrypt and secret is None:
            raise ConfigError("security.encrypt needs a key; set security.key or security.key_file")
        self.keyed = secret is not None
        self.encrypt_at_rest = encrypt
        self._keys = {purpose: _subkey(secret, purpose) for purpose in
                      ("chunk keys", "chunk mac", "salt tag", "encryption", "signature", "curve server",
                       "curve client")} if secret is not None else {}
        # Every keyed instance can open sealed chunks; `encrypt` decides only whether it writes them
        # (so turning it on or off across a fleet never makes one instance delete another's chunks).
        self._aead = AESGCM(self._keys["encryption"]) if self.keyed else None

    @classmethod
    def from_config(cls, config: "SecurityConfig") -> "Keyring":
        return cls(load_secret(config), config.encrypt)

    # -- digests -----------------------------------------------------------------------------

    def hasher(self, purpose: str = "chunk keys") -> "blake3.blake3":
        """A blake3 hasher keyed for `purpose` (plain blake3 over the purpose's name without a key)."""
        if not self.keyed:
            return blake3.blake3(_CONTEXT.format(purpose).encode() + b"\0")
        return blake3.blake3(key=self._keys[purpose])

    def salt_tag(self, salt: str) -> str:
        """What stores and tools show of a tenant's cache_salt."""
        hasher = self.hasher("salt tag")
        hasher.update(salt.encode())
        return hasher.hexdigest()[:16]

    # -- chunk tags --------------------------------------------------------------------------

    def tag(
        self, key_digest: bytes, header: bytes | memoryview, payload: bytes | memoryview, salt: bytes | None = None
    ) -> bytes:
        """TAG_BYTES authenticating a stored chunk under `key_digest`: a fresh random salt, then a
        GMAC of the payload under a one-time key derived (keyed blake3) from the salt, key digest
        and header. (`salt` is given only to check a stored tag.)

        Why not keyed blake3 over all of it: on this project's AVX2 machines GMAC (AES-NI and
        carry-less multiply) runs at twice blake3's speed on one core, and the tier stack verifies
        a chunk while reading the next: blake3 cut a warm disk load to 44% of its unauthenticated
        throughput, GMAC to 88%. A one-time key per chunk makes GCM's fixed nonce safe: no key is
        ever used twice, whatever the number of chunks.
        """
        if not self.keyed:
            checksum = xxhash.xxh3_128(key_digest)
            checksum.update(header)
            checksum.update(payload)
            return checksum.digest().ljust(TAG_BYTES, b"\0")
        salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
        one_time_key = blake3.blake3(salt + key_digest, key=self._keys["chunk mac"])
        one_time_key.update(header)
        gmac = AESGCM(one_time_key.digest()).encrypt(bytes(NONCE_BYTES), b"", payload)
        return salt + gmac

    def check_tag(self, stored: bytes | memoryview, key_digest: bytes, header: memoryview, payload: memoryview) -> None:
        stored = bytes(stored)
        if not hmac.compare_digest(stored, self.tag(key_digest, header, payload, stored[:SALT_BYTES])):
            raise CorruptChunk("failed authentication (forged, damaged, stored under another key, or written "
                               "with another security.key)")

    # -- encryption at rest ------------------------------------------------------------------

    def seal(self, payload: bytes | memoryview, associated: bytes) -> tuple[bytes, bytes]:
        """(nonce, AES-GCM ciphertext with its tag) of `payload`, bound to `associated`."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, payload, associated)

    def open(self, nonce: bytes, sealed: memoryview, associated: bytes) -> bytes:
        """The payload `seal` sealed; CorruptChunk if it was altered, moved, or sealed with another key."""
        if self._aead is None:
            raise CorruptChunk("chunk is encrypted, and security.key is none")
        if sealed.nbytes < GCM_TAG_BYTES:
            raise CorruptChunk("encrypted payload is shorter than its tag")
        try:
            return self._aead.decrypt(nonce, sealed, associated)
        except InvalidTag as exc:
            raise CorruptChunk("encrypted payload failed authentication (altered, moved to another key, "
                               "or sealed with another security.key)") from exc

    # -- signatures and port keys ------------------------------------------------------------

    def sign(self, message: bytes) -> str:
        """A signature of `message` only holders of the secret can make ('' without a key)."""
        if not self.keyed:
            return ""
        return blake3.blake3(message, key=self._keys["signature"]).hexdigest()

    def verify(self, message: bytes, signature: object) -> bool:
        if not self.keyed:
            return True
        return isinstance(signature, str) and hmac.compare_digest(signature, self.sign(message))

    def curve_keys(self, role: str) -> tuple[bytes, bytes] | None:
        """(public, secret) Z85 CURVE keys of `role` ("server" or "client"); None without a key.
        Every holder of the secret derives the same two key pairs."""
        if not self.keyed:
            return None
        secret_key = zmq.utils.z85.encode(self._keys[f"curve {role}"])
        return zmq.curve_public(secret_key), secret_key


def load_secret(config: "SecurityConfig") -> bytes | None:
    """The deployment secret from the config, the key file, or a key file made now; None if disabled."""
    if config.disabled:
        return None
    text = config.key if config.key is not None else _read_key_file(config.key_file, config.create_key_file)
    return blake3.blake3(text.strip().encode(), derive_key_context=_CONTEXT.format("deployment secret")).digest()


def _read_key_file(path: Path, create: bool) -> str:
    if not path.exists():
        if not create:
            raise ConfigError(f"security.key_file {path} does not exist; copy the deployment's key there "
                              "(every instance and the proxy need the same one)")
        _create_key_file(path)
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read security.key_file {path} ({exc.strerror}); check its owner and mode") from exc
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"security.key_file {path} is writable by other users; chmod 600 it")
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        logger.warning("kvshelf: security.key_file %s is readable by other users; chmod 600 it", path)
    if len(text.strip()) < 32:
        raise ConfigError(f"security.key_file {path} holds fewer than 32 characters; "
                          "put a random secret in it (e.g. `openssl rand -hex 32`)")
    return text


def _create_key_file(path: Path) -> None:
    """A new random secret at `path`, mode 0600; a race with another process leaves theirs."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp_path = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        descriptor = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(descriptor, (secrets.token_hex(32) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(tmp_path, path)  # atomic: fails if another process made the key first
            logger.info("kvshelf: created a deployment key at %s; give other hosts the same key", path)
        except FileExistsError:
            pass
        finally:
            tmp_path.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot create the key file {path} ({exc.strerror}); set security.key_file to a "
                          "writable place, or security.key") from exc
