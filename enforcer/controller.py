"""The control plane at run time: the store, the current objects, and changes applied live.

One :class:`Controller` owns the state. A write runs the pure operation, builds the next
snapshot (so an operation that would leave an unusable state fails before anything is
written), commits the changes in one SQLite transaction, and only then swaps the snapshot the
enforcer's requests read. Writes are serialised by a lock; reads see the last committed state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from enforcer import control, crl
from enforcer.clock import Clock
from enforcer.config import ConfigError, EnforcerConfig
from enforcer.control import (
    Limits,
    Outcome,
    apply_changes,
    build_snapshot,
    new_signing_key_object,
)
from enforcer.durations import format_duration, parse_duration
from enforcer.managed_ca import create_ca
from enforcer.snapshot import RootCertificate, Snapshot
from enforcer.store import Change, Objects, Store, StoreError

log = logging.getLogger(__name__)


def limits_of(config: EnforcerConfig) -> Limits:
    """The server facts that operations check against."""
    return Limits(
        served_hostnames=config.served_hostnames,
        issuer=config.issuer,
        grace_period=config.grace_period,
        no_duration_token_lifetime=config.no_duration_token_lifetime,
        max_chain_depth=config.server.max_chain_depth,
        key_profile=config.key_profile,
    )


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def seed_changes(config: EnforcerConfig, now: dt.datetime) -> list[Change]:
    """Turn the TOML configuration into the objects a new state starts with."""
    account = config.account_id
    changes = [
        Change(
            "account",
            account,
            {"id": account, "mtls_enabled": bool(config.roots or config.managed_cas)},
        ),
    ]
    for root in config.roots:
        pem = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (*root.intermediates, root.root)
        ).decode()
        changes.append(
            Change(
                "root",
                root.id,
                {
                    "id": root.id,
                    "account": account,
                    "name": root.name,
                    "certificate": pem,
                    "associated_hostnames": list(root.associated_hostnames),
                    "fingerprint": root.fingerprint,
                    "expires_on": _iso(root.expires_on),
                    "created_at": _iso(now),
                    "updated_at": _iso(now),
                    "crl_url": root.crl_url,
                    "crl_refresh": root.crl_refresh,
                    "crl_fail_open": root.crl_fail_open,
                },
            )
        )
        if root.crl_file is not None:
            changes += _seed_crl(config, root, changes, now)
    for i, app in enumerate(config.applications):
        oid = f"config-{i}-{app.hostname}"
        changes.append(
            Change(
                "app",
                oid,
                {
                    "id": oid,
                    "account": account,
                    "name": app.name,
                    "domain": app.hostname,
                    "aud": app.aud,
                    "session_duration": format_duration(app.session_duration),
                    "origin": app.origin,
                    "forward_client_certificate": app.forward_client_certificate,
                    "bind_token_to_certificate": app.bind_token_to_certificate,
                    "underscores_in_headers": app.underscores_in_headers,
                    "origin_ca": app.origin_ca,
                    "cookie": dataclasses.asdict(app.cookie),
                    "alpn": list(app.alpn),
                    "allowed_idps": list(config.allowed_idps.get(app.hostname, ())),
                    "policies": [
                        {"id": f"{oid}-policy-{j}", "precedence": j + 1, **p.to_dict()}
                        for j, p in enumerate(app.policies)
                    ],
                    "created_at": _iso(now),
                    "updated_at": _iso(now),
                },
            )
        )
    for ca in config.managed_cas:
        cert_pem, key_pem = create_ca(ca.zone, now)
        changes.append(
            Change(
                "zone_ca",
                ca.zone,
                {
                    "zone": ca.zone,
                    "certificate": cert_pem,
                    "private_key": key_pem,
                    "hostnames": list(ca.hostnames),
                    "created_at": _iso(now),
                },
            )
        )
    for idp in config.identity_providers:
        changes.append(Change(control.IDP_KIND, idp.id, control.idp_object(idp, account, now)))
    for configured in config.service_tokens:
        tok = configured.token
        changes.append(
            Change(
                control.SERVICE_TOKEN_KIND,
                tok.id,
                {
                    "id": tok.id,
                    "account": account,
                    "name": tok.name,
                    "client_id": tok.client_id,
                    "client_secret_sha256": tok.secret_sha256,
                    "duration": format_duration(configured.duration),
                    "expires_at": _iso(tok.expires_at),
                    "created_at": _iso(now),
                    "updated_at": _iso(now),
                },
            )
        )
    key = config.signing_key(now)
    key_obj = new_signing_key_object(key.private_key, now)
    changes.append(Change("signing_key", key_obj["kid"], key_obj))
    # Token algorithms (access-flow J7): the default, and the accounts' own with a key each.
    default = {"algorithm": config.signing_algorithm}
    changes.append(Change(control.SIGNING_KIND, control.SIGNING_DEFAULT, default))
    for aid, algorithm in sorted(config.account_algorithms.items()):
        so_far = apply_changes({}, changes).get("account", {})
        acc = dict(so_far.get(aid, {"id": aid, "mtls_enabled": False}))
        changes.append(Change("account", aid, {**acc, "token_algorithm": algorithm}))
    changes += control.settle_keys(apply_changes({}, changes), limits_of(config), now)
    for fp in sorted(config.revoked):
        changes.append(Change("revocation", fp, {"fingerprint": fp}))
    return changes


def _seed_crl(
    config: EnforcerConfig, root: RootCertificate, so_far: list[Change], now: dt.datetime
) -> tuple[Change, ...]:
    """The CRL object of a config root's ``crl`` file, checked at ``now``."""
    assert root.crl_file is not None
    objects = apply_changes({}, so_far)
    try:
        outcome = control.store_crl(
            objects, config.account_id, root.id, root.crl_file.read_bytes(), now, "file"
        )
    except (OSError, control.ApiError) as exc:
        raise ConfigError(config.path, "roots.crl", f"{root.crl_file}: {exc}") from None
    return outcome.changes


def crl_files(config: EnforcerConfig) -> dict[str, Path]:
    """Root id -> the CRL file the configuration names (re-read on each refresh)."""
    return {r.id: r.crl_file for r in config.roots if r.crl_file is not None}


def open_state(
    config: EnforcerConfig, now: dt.datetime, path: Path | None = None
) -> tuple[Store, int, Objects]:
    """Open the state database, seeding it from the configuration on first start."""
    target = path or config.state_path
    try:
        store = Store(target)
        generation, objects = store.load()
        if generation == 0:
            store.commit(seed_changes(config, now))
            generation, objects = store.load()
            log.info("state %s seeded from %s", target, config.path)
        else:
            log.info(
                "state %s at generation %d: config roots and applications are not re-imported",
                target,
                generation,
            )
    except StoreError as exc:
        raise ConfigError(config.path, "state.path", str(exc)) from None
    return store, generation, objects


class Controller:
    """Owns the stored objects and applies admin changes to the running enforcer."""

    def __init__(
        self,
        store: Store,
        generation: int,
        objects: Objects,
        limits: Limits,
        clock: Clock,
        on_snapshot: Callable[[Snapshot], None],
    ) -> None:
        self.store = store
        self.generation = generation
        self.objects = objects
        self.limits = limits
        self.clock = clock
        self._on_snapshot = on_snapshot
        self._lock = trio.Lock()

    def snapshot(self) -> Snapshot:
        """Build the snapshot of the current objects."""
        return build_snapshot(self.objects, self.generation, self.limits, self.clock.now())

    def read(self, op: Callable[[Objects, dt.datetime], Any]) -> Any:
        """Run a read-only operation on the current objects."""
        return op(self.objects, self.clock.now())

    async def write(self, op: Callable[[Objects, dt.datetime], Outcome]) -> Outcome:
        """Run an operation, commit its changes, and make them live; all or nothing."""
        async with self._lock:
            now = self.clock.now()
            outcome = op(self.objects, now)
            if not outcome.changes:
                return outcome
            objects = apply_changes(self.objects, outcome.changes)
            snapshot = build_snapshot(objects, self.generation + 1, self.limits, now)
            # The commit must finish even if the caller goes away: a 2xx follows it.
            with trio.CancelScope(shield=True):
                generation = await trio.to_thread.run_sync(self.store.commit, outcome.changes)
            self.objects, self.generation = objects, generation
            self._on_snapshot(dataclasses.replace(snapshot, generation=generation))
            return outcome

    def reload(self) -> bool:
        """Reload from the database when another process committed; True when it changed."""
        generation = self.store.generation()
        if generation == self.generation:
            return False
        self.generation, self.objects = self.store.load()
        self._on_snapshot(self.snapshot())
        return True


# ---- keeping uploaded roots' CRLs fresh --------------------------------------------------------


async def _crl_source(
    obj: Mapping[str, Any], files: Mapping[str, Path]
) -> tuple[bytes, str] | None:
    """The CRL bytes (and where from) of a root's config file, else its ``crl_url``."""
    path = files.get(obj["id"])
    if path is not None:
        try:
            return await trio.to_thread.run_sync(_read_bounded, path), str(path)
        except OSError as exc:
            raise crl.FetchError(f"{path}: cannot read the CRL file: {exc.strerror}") from None
    url = obj.get("crl_url")
    if url:
        return await crl.fetch_crl(url), url
    return None


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(crl.MAX_CRL_BYTES + 1)
    if len(data) > crl.MAX_CRL_BYTES:
        raise OSError(0, f"over {crl.MAX_CRL_BYTES} bytes")
    return data


async def refresh_crl(
    controller: Controller, root_id: str, files: Mapping[str, Path] | None = None
) -> str | None:
    """Fetch (or re-read) one root's CRL and put it in force; return the problem, or None.

    A CRL that does not verify, is out of date or older than the one in force is refused and
    the CRL in force stays; the problem is logged and shown by ``GET .../crl``.
    """
    obj = controller.objects.get("root", {}).get(root_id)
    if obj is None:
        return f"no root {root_id}"
    problem: str | None = None
    try:
        found = await _crl_source(obj, files or {})
        if found is None:
            return None
        data, source = found
        refused = await trio.to_thread.run_sync(
            control.warm_crl, controller.objects, obj["account"], root_id, data
        )
        if refused is not None:
            raise refused
        await controller.write(
            lambda objects, now: control.store_crl(
                objects, obj["account"], root_id, data, now, source
            )
        )
    except crl.CrlError as exc:
        problem = str(exc)
    except control.ApiError as exc:
        problem = exc.message
    if problem:
        log.warning("root %s: CRL not updated: %s", root_id, problem)
    await controller.write(
        lambda objects, now: control.record_fetch_error(objects, root_id, problem, now)
    )
    return problem


async def keep_crls_fresh(
    controller: Controller, files: Mapping[str, Path] | None = None, *, tick: float = 1.0
) -> None:
    """Refresh each root's CRL every ``crl_refresh`` (first at start) until cancelled.

    Run in one process only: with several workers the first one fetches and the state store
    carries the CRL to the others (they reload on its commit).
    """
    due: dict[str, float] = {}
    while True:
        for root_id, obj in list(controller.objects.get("root", {}).items()):
            if not obj.get("crl_url") and root_id not in (files or {}):
                continue
            if trio.current_time() < due.get(root_id, 0.0):
                continue
            refresh = parse_duration(obj.get("crl_refresh") or control.DEFAULT_CRL_REFRESH)
            due[root_id] = trio.current_time() + refresh.total_seconds()
            await refresh_crl(controller, root_id, files)
        await trio.sleep(tick)
