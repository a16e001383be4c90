"""Read the TLS ClientHello's server name before the handshake starts (like nginx's ssl_preread).

Knowing the SNI first lets the TLS layer build the connection from the right hostname's
context, so per-hostname settings that OpenSSL only takes at creation time (session cache and
tickets off for No Duration hostnames, the client-certificate request) apply from the start.

The reader is incremental and bounded, because the bytes come from a peer nobody has
authenticated yet: :class:`ClientHelloReader` parses each record header once as bytes arrive
(keeping its place between reads), and refuses a ClientHello larger than
:data:`MAX_CLIENT_HELLO` or spread over more than :data:`MAX_RECORDS` records. A real
ClientHello fits in one or two records; an attacker dripping thousands of 1-byte records is
refused after a few dozen bytes instead of being re-parsed on every read.
"""

from __future__ import annotations

import struct

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SNI = 0x0000
_MAX_RECORD = 16384 + 2048  # TLSPlaintext limit with the slack TLS 1.2 allows ciphertext
MAX_CLIENT_HELLO = 64 * 1024
MAX_RECORDS = 32


class NotClientHello(ValueError):
    """The bytes are not the start of a TLS ClientHello (or one too large to accept)."""


class ClientHelloReader:
    """Collect a ClientHello from the bytes a client sends, parsing each byte once.

    ``feed`` takes what the socket gave and returns True once the whole ClientHello message
    is in; ``data`` is every byte fed so far (what OpenSSL must then be given, including any
    bytes after the ClientHello) and ``server_name()`` its SNI.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self._message = bytearray()  # the handshake payload of the records read so far
        self._pos = 0  # where the next record header starts in ``data``
        self._records = 0
        self._need: int | None = None  # the ClientHello's size with its 4-byte header
        self.complete = False

    def feed(self, chunk: bytes) -> bool:
        """Add bytes from the client; return True when the ClientHello is complete.

        Raises :class:`NotClientHello` as soon as the bytes cannot be an acceptable one.
        """
        if self.complete:
            self.data += chunk
            return True
        if len(self.data) + len(chunk) > MAX_CLIENT_HELLO + MAX_RECORDS * 5 + _MAX_RECORD:
            raise NotClientHello(f"more than {MAX_CLIENT_HELLO} bytes without a whole ClientHello")
        self.data += chunk
        data = self.data
        if data[0] != _HANDSHAKE:
            raise NotClientHello(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
        if len(data) >= 2 and data[1] != 0x03:
            raise NotClientHello("record version is not TLS 1.x")
        # Each complete record is taken once; a partial one waits for the next feed.
        while self._pos + 5 <= len(data):
            if data[self._pos] != _HANDSHAKE:
                raise NotClientHello("a non-handshake record arrived before the ClientHello ended")
            (length,) = struct.unpack_from(">H", data, self._pos + 3)
            if length == 0 or length > _MAX_RECORD:
                raise NotClientHello(f"record length {length} is invalid")
            end = self._pos + 5 + length
            if end > len(data):
                break
            self._records += 1
            if self._records > MAX_RECORDS:
                raise NotClientHello(
                    f"the ClientHello is spread over more than {MAX_RECORDS} records "
                    "(a real one takes one or two)"
                )
            self._message += data[self._pos + 5 : end]
            self._pos = end
            if self._check_message():
                self.complete = True
                return True
        return False

    def _check_message(self) -> bool:
        message = self._message
        if message[0] != _CLIENT_HELLO:
            raise NotClientHello(f"handshake type {message[0]} is not ClientHello")
        if self._need is None:
            if len(message) < 4:
                return False
            self._need = 4 + int.from_bytes(message[1:4], "big")
            if self._need > MAX_CLIENT_HELLO:
                raise NotClientHello(f"ClientHello of {self._need} bytes is too large")
        return len(message) >= self._need

    def server_name(self) -> str | None:
        """Return the normalised SNI host name of the complete ClientHello (None when none)."""
        assert self.complete and self._need is not None
        return normalise_server_name(_server_name(bytes(self._message[: self._need])))


def normalise_server_name(name: str | None) -> str | None:
    """Lower-case an SNI name and drop trailing dots, as Host is (``A.Test.`` -> ``a.test``)."""
    if name is None:
        return None
    return name.lower().rstrip(".") or None


def _server_name(body: bytes) -> str | None:
    """Return the SNI host name in a ClientHello message (header included), None when none."""
    try:
        pos = 4 + 2 + 32  # header, client_version, random
        pos += 1 + body[pos]  # session id
        (n,) = struct.unpack_from(">H", body, pos)
        pos += 2 + n  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos >= len(body):
            return None  # no extensions
        (ext_total,) = struct.unpack_from(">H", body, pos)
        pos += 2
        end = min(len(body), pos + ext_total)
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from(">HH", body, pos)
            pos += 4
            if ext_type == _SNI:
                ext = body[pos : pos + ext_len]
                (list_len,) = struct.unpack_from(">H", ext, 0)
                p = 2
                while p + 3 <= 2 + list_len:
                    name_type = ext[p]
                    (name_len,) = struct.unpack_from(">H", ext, p + 1)
                    if name_type == 0:
                        return ext[p + 3 : p + 3 + name_len].decode("ascii")
                    p += 3 + name_len
                return None
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise NotClientHello(f"malformed ClientHello: {exc}") from None
    return None
