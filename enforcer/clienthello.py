"""Read the TLS ClientHello's server name before the handshake starts (like nginx's ssl_preread).

Knowing the SNI first lets the TLS layer build the connection from the right hostname's
context, so per-hostname settings that OpenSSL only takes at creation time (session cache and
tickets off for No Duration hostnames, the client-certificate request) apply from the start.
"""

from __future__ import annotations

import struct

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SNI = 0x0000
MAX_CLIENT_HELLO = 64 * 1024


class NotClientHello(ValueError):
    """The bytes are not the start of a TLS ClientHello."""


def records_needed(data: bytes) -> int | None:
    """Return how many bytes hold the whole ClientHello message, or None if unknown yet.

    Raises :class:`NotClientHello` as soon as the bytes cannot be a ClientHello.
    """
    if len(data) >= 1 and data[0] != _HANDSHAKE:
        raise NotClientHello(f"first byte 0x{data[0]:02x} is not a TLS handshake record")
    if len(data) >= 3 and data[1] != 0x03:
        raise NotClientHello("record version is not TLS 1.x")
    body = _handshake_bytes(data)
    if len(body) >= 1 and body[0] != _CLIENT_HELLO:
        raise NotClientHello(f"handshake type {body[0]} is not ClientHello")
    if len(body) < 4:
        return None
    need = 4 + int.from_bytes(body[1:4], "big")
    if need > MAX_CLIENT_HELLO:
        raise NotClientHello(f"ClientHello of {need} bytes is too large")
    return None if len(body) < need else len(data)


def _handshake_bytes(data: bytes) -> bytes:
    """Concatenate the payloads of the complete handshake records at the start of ``data``."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        if data[pos] != _HANDSHAKE:
            raise NotClientHello("a non-handshake record arrived before the ClientHello ended")
        (length,) = struct.unpack_from(">H", data, pos + 3)
        if length == 0 or length > 16384 + 2048:
            raise NotClientHello(f"record length {length} is invalid")
        out += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def server_name(data: bytes) -> str | None:
    """Return the SNI host name of a complete ClientHello, or None when it sends none."""
    body = _handshake_bytes(data)
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
                        return ext[p + 3 : p + 3 + name_len].decode("ascii").lower()
                    p += 3 + name_len
                return None
            pos += ext_len
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise NotClientHello(f"malformed ClientHello: {exc}") from None
    return None
