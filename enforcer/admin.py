"""The admin API: Cloudflare-v4-style JSON over HTTP/1.1 on its own listener.

Routes follow Cloudflare's paths (``/client/v4/accounts/{account}/access/...`` and
``/client/v4/zones/{zone}/client_certificates...``), answers use its envelope (``success``,
``errors``, ``messages``, ``result``). Every call needs ``Authorization: Bearer <token>``;
without it the answer is 401 and nothing changes. Writes go through the
:class:`~enforcer.controller.Controller`, which commits before the 2xx is sent.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from enforcer import control
from enforcer.config import AdminSettings, is_loopback
from enforcer.control import ApiError, Outcome
from enforcer.controller import Controller
from enforcer.http import BodyTooLarge, header_values, next_event, read_body, respond, send
from enforcer.metrics import CONTENT_TYPE, EnforcerMetrics, Readiness
from enforcer.sockets import linger

log = logging.getLogger(__name__)
MAX_ADMIN_BODY = 1024 * 1024
# A request (head and body) must arrive within this many seconds of its first byte: a client
# that sends one byte a second is cut. Between requests a kept-alive connection may idle longer.
ADMIN_REQUEST_TIMEOUT = 10.0
ADMIN_IDLE_TIMEOUT = 60.0
# After refusing a request without reading its body, read and discard at most this much
# (within the time bounds of enforcer.sockets.linger) before closing, so that the refusal is
# not lost to a TCP reset.
LINGER_BYTES = MAX_ADMIN_BODY + 65536
# JSON bodies are small objects: deeper nesting is refused before any handler recurses into it.
MAX_JSON_DEPTH = 32
_SEG = r"([A-Za-z0-9._:-]+)"

Handler = Callable[["_Call"], Awaitable["Outcome | tuple[int, str, bytes]"]]


class _Call:
    """One admin request: path parameters, query and parsed JSON body."""

    def __init__(
        self,
        controller: Controller,
        params: tuple[str, ...],
        query: dict[str, list[str]],
        body: bytes,
    ) -> None:
        self.controller = controller
        self.params = params
        self.query = query
        self._raw = body

    def json(self) -> Any:
        if not self._raw.strip():
            return {}
        try:
            value = json.loads(self._raw)
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        except ValueError as exc:
            # JSONDecodeError, UnicodeDecodeError, and int()'s digit limit (4300 by default).
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if isinstance(value, dict | list) and _depth_over(value, MAX_JSON_DEPTH):
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        return value

    def read(self, op: Callable[..., Outcome], *args: Any) -> Outcome:
        return op(self.controller.objects, *args)

    async def write(self, op: Callable[..., Outcome], *args: Any, now: bool = True) -> Outcome:
        if now:
            return await self.controller.write(lambda objects, t: op(objects, *args, t))
        return await self.controller.write(lambda objects, t: op(objects, *args))


def _routes() -> list[tuple[str, re.Pattern[str], Handler]]:
    A = rf"/client/v4/accounts/{_SEG}/access"
    Z = rf"/client/v4/zones/{_SEG}"
    table: list[tuple[str, str, Handler]] = []

    def route(method: str, pattern: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            table.append((method, pattern, fn))
            return fn

        return deco

    @route("GET", rf"{A}/mtls")
    async def mtls_get(c: _Call) -> Outcome:
        return c.read(control.get_mtls, c.params[0])

    @route("PUT", rf"{A}/mtls")
    async def mtls_put(c: _Call) -> Outcome:
        return await c.write(control.set_mtls, c.params[0], c.json())

    @route("GET", rf"{A}/signing")
    async def signing_get(c: _Call) -> Outcome:
        return c.read(control.get_signing, c.params[0])

    @route("PUT", rf"{A}/signing")
    async def signing_put(c: _Call) -> Outcome:
        account, body, limits = c.params[0], c.json(), c.controller.limits
        return await c.controller.write(
            lambda objects, now: control.set_signing(objects, account, body, limits, now)
        )

    @route("GET", rf"{A}/certificates")
    async def roots_list(c: _Call) -> Outcome:
        return c.read(control.list_roots, c.params[0])

    @route("POST", rf"{A}/certificates")
    async def roots_create(c: _Call) -> Outcome:
        return await c.write(control.create_root, c.params[0], c.json())

    @route("GET", rf"{A}/certificates/{_SEG}")
    async def roots_get(c: _Call) -> Outcome:
        return c.read(control.get_root, *c.params)

    @route("PUT", rf"{A}/certificates/{_SEG}")
    async def roots_update(c: _Call) -> Outcome:
        return await c.write(control.update_root, *c.params, c.json())

    @route("DELETE", rf"{A}/certificates/{_SEG}")
    async def roots_delete(c: _Call) -> Outcome:
        return await c.write(control.delete_root, *c.params, now=False)

    @route("GET", rf"{A}/certificates/{_SEG}/crl")
    async def crl_root_get(c: _Call) -> Outcome:
        return c.read(control.get_crl, *c.params)

    @route("PUT", rf"{A}/certificates/{_SEG}/crl")
    async def crl_root_put(c: _Call) -> Outcome:
        body = c.json()
        # A big CRL is parsed and verified off the trio loop first (see control.warm_crl).
        refused = await trio.to_thread.run_sync(
            control.warm_crl, c.controller.objects, c.params[0], c.params[1], body
        )
        if refused is not None:
            raise refused
        return await c.write(control.put_crl, *c.params, body)

    @route("GET", rf"{A}/revocations")
    async def revocations_list(c: _Call) -> Outcome:
        return c.read(control.list_revocations, c.params[0])

    @route("POST", rf"{A}/revocations")
    async def revocations_add(c: _Call) -> Outcome:
        return await c.write(control.add_revocation, c.params[0], c.json())

    @route("DELETE", rf"{A}/revocations/{_SEG}")
    async def revocations_delete(c: _Call) -> Outcome:
        return await c.write(control.delete_revocation, *c.params, now=False)

    @route("GET", rf"{A}/apps")
    async def apps_list(c: _Call) -> Outcome:
        return c.read(control.list_apps, c.params[0])

    @route("POST", rf"{A}/apps")
    async def apps_create(c: _Call) -> Outcome:
        return await c.write(control.create_app, c.params[0], c.json(), c.controller.limits)

    @route("GET", rf"{A}/apps/{_SEG}")
    async def apps_get(c: _Call) -> Outcome:
        return c.read(control.get_app, *c.params)

    @route("PUT", rf"{A}/apps/{_SEG}")
    async def apps_update(c: _Call) -> Outcome:
        return await c.write(control.update_app, *c.params, c.json(), c.controller.limits)

    @route("DELETE", rf"{A}/apps/{_SEG}")
    async def apps_delete(c: _Call) -> Outcome:
        return await c.write(control.delete_app, *c.params, now=False)

    @route("POST", rf"{A}/apps/{_SEG}/revoke_tokens")
    async def apps_revoke_tokens(c: _Call) -> Outcome:
        return await c.write(control.revoke_app_sessions, *c.params)

    @route("POST", rf"{A}/revoke_tokens")
    async def account_revoke_tokens(c: _Call) -> Outcome:
        return await c.write(control.revoke_account_sessions, c.params[0], c.json())

    @route("GET", rf"{A}/apps/{_SEG}/policies")
    async def policies_list(c: _Call) -> Outcome:
        return c.read(control.list_policies, *c.params)

    @route("POST", rf"{A}/apps/{_SEG}/policies")
    async def policies_create(c: _Call) -> Outcome:
        return await c.write(control.create_policy, *c.params, c.json())

    @route("GET", rf"{A}/apps/{_SEG}/policies/{_SEG}")
    async def policies_get(c: _Call) -> Outcome:
        return c.read(control.get_policy, *c.params)

    @route("PUT", rf"{A}/apps/{_SEG}/policies/{_SEG}")
    async def policies_update(c: _Call) -> Outcome:
        return await c.write(control.update_policy, *c.params, c.json())

    @route("DELETE", rf"{A}/apps/{_SEG}/policies/{_SEG}")
    async def policies_delete(c: _Call) -> Outcome:
        return await c.write(control.delete_policy, *c.params)

    @route("GET", rf"{A}/identity_providers")
    async def idps_list(c: _Call) -> Outcome:
        return c.read(control.list_idps, c.params[0])

    @route("POST", rf"{A}/identity_providers")
    async def idps_create(c: _Call) -> Outcome:
        return await c.write(control.create_idp, c.params[0], c.json())

    @route("GET", rf"{A}/identity_providers/{_SEG}")
    async def idps_get(c: _Call) -> Outcome:
        return c.read(control.get_idp, *c.params)

    @route("PUT", rf"{A}/identity_providers/{_SEG}")
    async def idps_update(c: _Call) -> Outcome:
        return await c.write(control.update_idp, *c.params, c.json())

    @route("DELETE", rf"{A}/identity_providers/{_SEG}")
    async def idps_delete(c: _Call) -> Outcome:
        return await c.write(control.delete_idp, *c.params, now=False)

    @route("GET", rf"{A}/service_tokens")
    async def service_tokens_list(c: _Call) -> Outcome:
        return c.read(control.list_service_tokens, c.params[0])

    @route("POST", rf"{A}/service_tokens")
    async def service_tokens_create(c: _Call) -> Outcome:
        return await c.write(control.create_service_token, c.params[0], c.json())

    @route("GET", rf"{A}/service_tokens/{_SEG}")
    async def service_tokens_get(c: _Call) -> Outcome:
        return c.read(control.get_service_token, *c.params)

    @route("PUT", rf"{A}/service_tokens/{_SEG}")
    async def service_tokens_update(c: _Call) -> Outcome:
        return await c.write(control.update_service_token, *c.params, c.json())

    @route("DELETE", rf"{A}/service_tokens/{_SEG}")
    async def service_tokens_delete(c: _Call) -> Outcome:
        return await c.write(control.delete_service_token, *c.params, now=False)

    @route("POST", rf"{A}/service_tokens/{_SEG}/refresh")
    async def service_tokens_refresh(c: _Call) -> Outcome:
        return await c.write(control.refresh_service_token, *c.params)

    @route("POST", rf"{A}/service_tokens/{_SEG}/rotate")
    async def service_tokens_rotate(c: _Call) -> Outcome:
        return await c.write(control.rotate_service_token, *c.params)

    @route("GET", rf"{A}/keys")
    async def keys_get(c: _Call) -> Outcome:
        controller = c.controller
        return control.get_keys(controller.objects, controller.limits, controller.clock.now())

    @route("POST", rf"{A}/keys/rotate")
    async def keys_rotate(c: _Call) -> Outcome:
        body = c.json()
        return await c.controller.write(
            lambda objects, now: control.rotate_keys(objects, c.controller.limits, now, body)
        )

    @route("GET", rf"{Z}/certificate_authorities/hostname_associations")
    async def ca_hostnames_get(c: _Call) -> Outcome:
        ca = c.read(control.get_ca, c.params[0]).result
        return Outcome({"hostnames": ca["hostnames"]})

    @route("PUT", rf"{Z}/certificate_authorities/hostname_associations")
    async def ca_hostnames_put(c: _Call) -> Outcome:
        return await c.write(control.set_ca_hostnames, c.params[0], c.json())

    @route("GET", rf"{Z}/client_certificates/ca")
    async def ca_get(c: _Call) -> Outcome:
        return c.read(control.get_ca, c.params[0])

    @route("GET", rf"{Z}/client_certificates/crl")
    async def crl_get(c: _Call) -> tuple[int, str, bytes]:
        pem = c.controller.read(lambda objects, now: control.zone_crl(objects, c.params[0], now))
        return 200, "application/x-pem-file", pem

    @route("GET", rf"{Z}/client_certificates")
    async def certs_list(c: _Call) -> Outcome:
        status = c.query.get("status", [None])[0]
        return c.read(control.list_client_certs, c.params[0], status)

    @route("POST", rf"{Z}/client_certificates")
    async def certs_create(c: _Call) -> Outcome:
        return await c.write(control.create_client_cert, c.params[0], c.json())

    @route("GET", rf"{Z}/client_certificates/{_SEG}")
    async def certs_get(c: _Call) -> Outcome:
        return c.read(control.get_client_cert, *c.params)

    @route("DELETE", rf"{Z}/client_certificates/{_SEG}")
    async def certs_revoke(c: _Call) -> Outcome:
        return await c.write(control.revoke_client_cert, *c.params)

    @route("PATCH", rf"{Z}/client_certificates/{_SEG}")
    async def certs_reactivate(c: _Call) -> Outcome:
        return await c.write(control.reactivate_client_cert, *c.params, c.json(), now=False)

    return [(m, re.compile(p + r"/?\Z"), fn) for m, p, fn in table]


ROUTES = _routes()


def _depth_over(value: Any, limit: int) -> bool:
    """True when ``value`` nests lists and objects more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def envelope(result: Any = None, errors: list[dict[str, Any]] | None = None) -> bytes:
    """Encode a Cloudflare v4 envelope."""
    body: dict[str, Any] = {
        "success": not errors,
        "errors": errors or [],
        "messages": [],
        "result": result,
    }
    if isinstance(result, list):
        body["result_info"] = {
            "page": 1,
            "per_page": len(result),
            "count": len(result),
            "total_count": len(result),
        }
    return (json.dumps(body, indent=2) + "\n").encode()


def _error(status: int, message: str, code: int | None = None) -> tuple[int, bytes]:
    err = ApiError(status, message, code)
    return status, envelope(None, [{"code": err.code, "message": message}])


# The operations endpoints (docs/metrics.md). The probes answer anyone (a kubelet probes the
# pod's address and carries no token); /metrics needs the admin token unless the listener is
# bound to loopback.
METRICS_PATH, HEALTH_PATH, READY_PATH = "/metrics", "/healthz", "/readyz"
PROBE_PATHS = frozenset({HEALTH_PATH, READY_PATH})


@dataclasses.dataclass(frozen=True)
class Operations:
    """What the operations endpoints read: the enforcer's metrics and readiness."""

    metrics: EnforcerMetrics
    readiness: Readiness


class AdminServer:
    """Serves the admin API for one controller, and the operations endpoints."""

    def __init__(
        self,
        controller: Controller | None,
        settings: AdminSettings | None,
        *,
        request_timeout: float = ADMIN_REQUEST_TIMEOUT,
        operations: Operations | None = None,
        loopback: bool = False,
    ) -> None:
        self.controller = controller
        # Without admin settings (a metrics listener and no [admin]) no token opens anything.
        self._token = f"Bearer {settings.token}".encode() if settings is not None else None
        self.request_timeout = request_timeout
        self.operations = operations
        self.loopback = loopback

    def _authorised(self, request: h11.Request) -> bool:
        if self._token is None:
            return False
        values = header_values(request.headers, b"authorization")
        # compare_digest: the token must not leak through timing.
        return len(values) == 1 and hmac.compare_digest(values[0].encode("latin-1"), self._token)

    def _open(self, request: h11.Request) -> bool:
        """True for an operations endpoint that needs no token here."""
        if self.operations is None:
            return False
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        return path in PROBE_PATHS or (path == METRICS_PATH and self.loopback)

    async def _operation(self, request: h11.Request, path: str) -> tuple[int, str, bytes]:
        """Answer /metrics, /healthz or /readyz."""
        assert self.operations is not None
        if request.method != b"GET":
            status, data = _error(
                405, f"{request.method.decode()} is not allowed on {path}; use GET"
            )
            return status, "application/json", data
        if path == HEALTH_PATH:
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == READY_PATH:
            ready, checks = await self.operations.readiness.check()
            body: dict[str, Any] = {"ready": ready}
            # The checks name origins and their errors: only for this machine or the token.
            if self.loopback or self._authorised(request):
                body["checks"] = checks
            return 200 if ready else 503, "application/json", (json.dumps(body) + "\n").encode()
        return 200, CONTENT_TYPE, self.operations.metrics.render()

    async def dispatch(self, request: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        """Route one request; return (status, content type, body)."""
        path = request.target.split(b"?", 1)[0].decode("latin-1")
        operation = self.operations is not None and (path in PROBE_PATHS or path == METRICS_PATH)
        if operation and (self._open(request) or self._authorised(request)):
            return await self._operation(request, path)
        if not self._authorised(request):
            return _unauthorised()
        url = urlsplit(request.target.decode("latin-1"))
        if self.controller is None:  # a metrics listener: no API
            status, data = _error(404, f"no route {url.path} (this listener serves metrics)")
            return status, "application/json", data
        method = request.method.decode()
        allowed = []
        for route_method, pattern, handler in ROUTES:
            match = pattern.match(url.path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            assert self.controller is not None
            call = _Call(self.controller, match.groups(), parse_qs(url.query), body)
            try:
                result = await handler(call)
            except ApiError as exc:
                status, data = _error(exc.status, exc.message, exc.code)
                return status, "application/json", data
            if isinstance(result, tuple):
                return result
            return result.status, "application/json", envelope(result.result)
        if allowed:
            status, data = _error(
                405, f"{method} is not allowed on {url.path}; use {', '.join(sorted(set(allowed)))}"
            )
        else:
            status, data = _error(404, f"no admin route {url.path}")
        return status, "application/json", data

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one admin connection (keep-alive) until it closes."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event, request_deadline = await self._next_head(conn, stream)
                if event is None:
                    return  # closed, idle or too slow: nothing to answer
                # Authenticate on the head alone: a stranger's body is never read.
                if not self._authorised(event) and not self._open(event):
                    await _refuse(conn, stream, *_unauthorised())
                    return
                too_large = _declared_too_large(event)
                if too_large:
                    await _refuse(conn, stream, *too_large)
                    return
                if conn.they_are_waiting_for_100_continue:
                    await send(conn, stream, h11.InformationalResponse(status_code=100, headers=[]))
                body, over = b"", False
                with trio.move_on_at(request_deadline) as scope:
                    try:
                        body = await read_body(conn, stream, MAX_ADMIN_BODY)
                    except BodyTooLarge:
                        over = True  # chunked: no Content-Length to refuse it by
                if over or scope.cancelled_caught:
                    status, data = (
                        _error(413, f"the request body is over {MAX_ADMIN_BODY} bytes")
                        if over
                        else _error(
                            408, f"the request did not arrive within {self.request_timeout:g} s"
                        )
                    )
                    await _refuse(conn, stream, status, "application/json", data)
                    return
                try:
                    status, ctype, data = await self.dispatch(event, body)
                except Exception:
                    log.exception("admin: unexpected error on %s %s", event.method, event.target)
                    status, data = _error(500, "internal error (see the server log)")
                    ctype = "application/json"
                await respond(conn, stream, status, [("content-type", ctype)], data)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _next_head(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request | None, float]:
        """The next request head (None: closed, idle or too slow) and the request's deadline:
        idle for its first byte, then request_timeout for the whole request, head and body."""
        pipelined = conn.next_event()
        if pipelined is h11.NEED_DATA:
            with trio.move_on_after(ADMIN_IDLE_TIMEOUT) as idle:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            if idle.cancelled_caught:
                return None, 0.0
        deadline = trio.current_time() + self.request_timeout
        event: object = pipelined
        if pipelined is h11.NEED_DATA:
            with trio.move_on_at(deadline) as scope:
                event = await next_event(conn, stream)
            if scope.cancelled_caught:
                return None, deadline
        return (event if isinstance(event, h11.Request) else None), deadline


def _unauthorised() -> tuple[int, str, bytes]:
    status, data = _error(
        401, "missing or wrong admin token: send Authorization: Bearer <token>", 10000
    )
    return status, "application/json", data


def _declared_too_large(request: h11.Request) -> tuple[int, str, bytes] | None:
    """A 413 answer when the head declares a body over the limit (refused before reading)."""
    lengths = header_values(request.headers, b"content-length")
    # h11 has already checked that Content-Length is one well-formed number.
    if lengths and int(lengths[0]) > MAX_ADMIN_BODY:
        status, data = _error(413, f"the request body is over {MAX_ADMIN_BODY} bytes")
        return status, "application/json", data
    return None


async def _refuse(
    conn: h11.Connection, stream: trio.SocketStream, status: int, ctype: str, data: bytes
) -> None:
    """Answer and close without reading the request's body (a bounded lingering close)."""
    await respond(conn, stream, status, [("content-type", ctype), ("connection", "close")], data)
    # Closing with unread bytes makes the kernel send a reset, which can destroy the answer
    # before the client reads it (see enforcer/sockets.py).
    await linger(stream, LINGER_BYTES)


async def serve_admin(
    controller: Controller,
    settings: AdminSettings,
    listener: trio.SocketListener,
    *,
    request_timeout: float = ADMIN_REQUEST_TIMEOUT,
    operations: Operations | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API (and the operations endpoints, if given) until cancelled."""
    server = AdminServer(
        controller,
        settings,
        request_timeout=request_timeout,
        operations=operations,
        loopback=is_loopback(settings.host),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.serve_listeners, server.handle, [listener]))
        task_status.started(listener.socket.getsockname()[1])


async def serve_operations(
    operations: Operations,
    settings: AdminSettings | None,
    listener: trio.SocketListener,
    host: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve only /metrics, /healthz and /readyz (``server.metrics_port``) until cancelled."""
    server = AdminServer(None, settings, operations=operations, loopback=is_loopback(host))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.serve_listeners, server.handle, [listener]))
        task_status.started(listener.socket.getsockname()[1])
