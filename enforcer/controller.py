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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from enforcer.clock import Clock
from enforcer.config import ConfigError, EnforcerConfig
from enforcer.control import (
    Limits,
    Outcome,
    apply_changes,
    build_snapshot,
    new_signing_key_object,
)
from enforcer.durations import format_duration
from enforcer.managed_ca import create_ca
from enforcer.snapshot import Snapshot
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
                },
            )
        )
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
                    "cookie": dataclasses.asdict(app.cookie),
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
    key = config.signing_key(now)
    key_obj = new_signing_key_object(key.private_key, now)
    changes.append(Change("signing_key", key_obj["kid"], key_obj))
    for fp in sorted(config.revoked):
        changes.append(Change("revocation", fp, {"fingerprint": fp}))
    return changes


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
