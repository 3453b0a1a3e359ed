"""The encrypted backup file: an authenticated header, then the body in AES-256-GCM chunks.

Layout::

    MAGIC (8 bytes) | header length (u32, big-endian) | header (JSON) | header MAC (32 bytes)
    then chunks:      ciphertext length (u32) | ciphertext (plaintext + 16-byte GCM tag)

The header (format version, key id, creation time, schema version, a random salt) is
readable without the key, so a wrong key is told apart from a damaged file. Two keys are
derived (HKDF-SHA256) from the backup key and the file's salt: one MACs the header, one
encrypts the body. Every chunk's nonce is its counter (11 bytes) and a last-chunk flag (1
byte), and every chunk carries the header as associated data: a chunk moved, dropped,
repeated or taken from another file, a missing tail, a tail appended, one flipped byte
anywhere, each fails authentication. (This is the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár, "Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance".)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hexa.hub.errors import HubError

MAGIC = b"HEXABAK\x00"
FORMAT_VERSION = 1
#: plaintext bytes per chunk: memory stays at a few chunks whatever the backup's size
CHUNK_SIZE = 1 << 20
_MAX_HEADER = 64 * 1024
_TAG = 16
_LEN = struct.Struct(">I")


class BackupError(HubError):
    """A backup cannot be written, read or restored; the message is one line for the
    operator (what is wrong and what to do)."""

    code = "backup_error"


def _derive(secret: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


class BackupKey:
    """The operator's backup key (any string of at least 32 characters, generated
    ``secrets.token_urlsafe(32)`` by default) and what is derived from it."""

    def __init__(self, text: str) -> None:
        self._master = _derive(text.strip().encode(), b"hexa backup master key")
        #: names the key without revealing it: printed, and stored in each backup's header
        self.key_id = _derive(self._master, b"hexa backup key id").hex()[:16]

    def file_keys(self, salt: bytes) -> tuple[bytes, bytes]:
        """(header MAC key, body encryption key) of the file with this salt."""
        return (
            _derive(self._master, b"hexa backup v1 header", salt),
            _derive(self._master, b"hexa backup v1 body", salt),
        )


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class EncryptedWriter:
    """Writes the header, then encrypts what it is given into chunks. ``close`` writes the
    last chunk (flagged, possibly empty): without it the file reads as truncated."""

    def __init__(self, out: BinaryIO, key: BackupKey, header: dict[str, Any]) -> None:
        salt = os.urandom(16)
        fields = {
            "format": FORMAT_VERSION,
            "key_id": key.key_id,
            "salt": base64.b64encode(salt).decode(),
            "chunk_size": CHUNK_SIZE,
            **header,
        }
        mac_key, body_key = key.file_keys(salt)
        text = json.dumps(fields, sort_keys=True).encode()
        self._aad = MAGIC + _LEN.pack(len(text)) + text
        self._out = out
        self._aead = AESGCM(body_key)
        self._buffer = bytearray()
        self._counter = 0
        self.bytes_written = 0
        self.header = fields
        self._emit(self._aad + hmac.new(mac_key, self._aad, hashlib.sha256).digest())

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.bytes_written += len(data)

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE + 1:  # keep a byte back: the last chunk is flagged
            self._seal(bytes(self._buffer[:CHUNK_SIZE]), last=False)
            del self._buffer[:CHUNK_SIZE]

    def _seal(self, plain: bytes, *, last: bool) -> None:
        sealed = self._aead.encrypt(_nonce(self._counter, last), plain, self._aad)
        self._counter += 1
        self._emit(_LEN.pack(len(sealed)) + sealed)

    def close(self) -> None:
        self._seal(bytes(self._buffer), last=True)
        self._buffer.clear()


def read_header(src: BinaryIO) -> tuple[dict[str, Any], bytes, bytes]:
    """(header fields, the header block, its MAC), read from the start of ``src``."""
    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        raise BackupError("not a Hexa backup file (its first bytes are not a backup header)")
    raw_len = src.read(4)
    if len(raw_len) != 4:
        raise BackupError("the backup file is truncated (in its header)")
    (length,) = _LEN.unpack(raw_len)
    if length > _MAX_HEADER:
        raise BackupError("the backup file's header is damaged (impossible length)")
    text = src.read(length)
    mac = src.read(32)
    if len(text) != length or len(mac) != 32:
        raise BackupError("the backup file is truncated (in its header)")
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError
    except ValueError:
        raise BackupError("the backup file's header is damaged (not readable)") from None
    return fields, MAGIC + raw_len + text, mac


class EncryptedReader:
    """Authenticates the header, then yields the body's plaintext chunk by chunk. Raises
    :class:`BackupError` (one line) at the first sign of a wrong key or damage."""

    def __init__(self, src: BinaryIO, key: BackupKey) -> None:
        fields, block, mac = read_header(src)
        if fields.get("format") != FORMAT_VERSION:
            raise BackupError(
                f"backup format {fields.get('format')!r} is not supported by this hub "
                f"(it reads format {FORMAT_VERSION}): restore it with a newer hub"
            )
        if fields.get("key_id") != key.key_id:
            raise BackupError(
                f"wrong key: the backup was made with key {fields.get('key_id')}, this hub's "
                f"HEXA_BACKUP_KEY is key {key.key_id} (or the file's header is damaged)"
            )
        try:
            salt = base64.b64decode(str(fields["salt"]), validate=True)
        except (KeyError, ValueError):
            raise BackupError("the backup file's header is damaged") from None
        mac_key, body_key = key.file_keys(salt)
        if not hmac.compare_digest(hmac.new(mac_key, block, hashlib.sha256).digest(), mac):
            raise BackupError("the backup file's header is damaged (it fails authentication)")
        self.header = fields
        self._src = src
        self._aad = block
        self._aead = AESGCM(body_key)
        self._chunk_size = int(fields.get("chunk_size", CHUNK_SIZE))

    def chunks(self) -> Iterator[bytes]:
        counter = 0
        while True:
            raw_len = self._src.read(4)
            if len(raw_len) != 4:
                raise BackupError(
                    f"the backup file is truncated (after {counter} chunk(s), its end is missing)"
                )
            (length,) = _LEN.unpack(raw_len)
            if not _TAG <= length <= self._chunk_size + _TAG:
                raise BackupError(f"the backup file is damaged (chunk {counter} has a bad length)")
            sealed = self._src.read(length)
            if len(sealed) != length:
                raise BackupError(f"the backup file is truncated (in chunk {counter})")
            plain: bytes | None = None
            for last in (False, True):
                try:
                    plain = self._aead.decrypt(_nonce(counter, last), sealed, self._aad)
                except InvalidTag:
                    continue
                if last:
                    if self._src.read(1):
                        raise BackupError("the backup file is damaged (data after its end)")
                    yield plain
                    return
                break
            if plain is None:
                raise BackupError(
                    f"the backup file is damaged (chunk {counter} fails authentication)"
                )
            counter += 1
            yield plain


def lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The newline-terminated lines of a chunked stream (without their newline)."""
    rest = b""
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        parts = data.split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        raise BackupError("the backup's content is damaged (it ends in the middle of a line)")
