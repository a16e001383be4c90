"""A run's PKIs: one provisioned fleet per CA hierarchy a scenario declares.

A scenario without ``[[pkis]]`` has one PKI, ``fleet``, provisioned into ``RUN_DIR/fleet`` as
before; with several, each goes to ``RUN_DIR/fleets/<name>``. A trusted PKI's root is
associated with the target's hostname; an untrusted one is known to the enforcer but bound to
another hostname, so its devices are refused with ``untrusted_issuer`` (access-flow A5: a root
authorises client certificates only for its own hostnames).

A run revokes devices the way their operator would: in CRLs signed with each PKI's own CA keys
(:class:`RunCrls`). The ``defect = "revoked"`` devices are listed from the start, and a
``revoke`` event adds more and publishes the CRLs again. The enforcer holds one CRL per uploaded
root, its devices' issuer's; nginx checks every CA of the path, so it gets one for each.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from devices.provision import (
    Cohort,
    Fleet,
    FleetKeysMissing,
    fleet_cas,
    fleet_crls,
    provision,
    read_inventory,
)
from devices.provision import Device as FleetDevice
from testbed.scenario import PkiSpec, Scenario


@dataclasses.dataclass(frozen=True)
class Member:
    """One device of a run, with the PKI that issued it and the folder of its fleet."""

    pki: str
    fleet: Path
    device: FleetDevice

    @property
    def id(self) -> str:
        """The device's id (unique in the run: cohort names are)."""
        return self.device.id

    @property
    def cohort(self) -> str:
        """The device's cohort."""
        return self.device.cohort

    @property
    def sha256(self) -> str:
        """The fingerprint of the device's certificate."""
        return self.device.sha256

    @property
    def serial(self) -> int:
        """The serial number of the device's certificate."""
        return int(self.device.serial, 16)


@dataclasses.dataclass(frozen=True)
class RunFleet:
    """The fleets of a run, one per PKI, in the scenario's order."""

    fleets: tuple[tuple[PkiSpec, Fleet], ...]

    @property
    def size(self) -> int:
        """The number of devices, all PKIs together."""
        return sum(f.size for _, f in self.fleets)

    @property
    def trusted(self) -> list[Fleet]:
        """The fleets whose roots the target trusts for its hostname."""
        return [f for pki, f in self.fleets if pki.trusted]

    def fleet(self, pki: str) -> Fleet:
        """The fleet of one PKI."""
        return next(f for spec, f in self.fleets if spec.name == pki)

    def members(self) -> list[Member]:
        """Every device, PKI by PKI, each fleet's in id order."""
        return [
            Member(spec.name, fleet.root, d) for spec, fleet in self.fleets for d in fleet.devices()
        ]

    def client_ca(self, path: Path) -> Path:
        """Write the bundle a target that only takes one file trusts: every trusted upload."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(f.upload.read_bytes() for f in self.trusted))
        return path


def provision_pkis(scenario: Scenario, run_dir: Path, now: dt.datetime) -> RunFleet:
    """Provision every PKI of a scenario with its cohorts."""
    single = len(scenario.pkis) == 1
    fleets = []
    for pki in scenario.pkis:
        cohorts = [
            Cohort(c.name, c.size, c.defect, c.key_type)
            for c in scenario.cohorts
            # People with a laptop certificate are provisioned like devices; service tokens
            # and people without one have no certificate.
            if c.pki == pki.name and c.provisioned
        ]
        size = sum(c.size for c in cohorts)
        fleet = provision(
            run_dir / "fleet" if single else run_dir / "fleets" / pki.name,
            cohorts,
            now,
            key_type=pki.key_type,
            intermediates=pki.intermediates,
            p12=False,
            workers=1 if size < 200 else None,
        )
        fleets.append((pki, fleet))
    return RunFleet(tuple(fleets))


def open_fleet(folder: Path) -> tuple[RunFleet, dict[str, FleetDevice]]:
    """A provisioned fleet folder as a one-PKI run fleet, with one device of each cohort."""
    devices = read_inventory(folder)
    counts = Counter(d.cohort for d in devices)
    first: dict[str, FleetDevice] = {}
    for d in devices:
        first.setdefault(d.cohort, d)
    cohorts = tuple(
        Cohort(name, n, first[name].defect, first[name].key_type) for name, n in counts.items()
    )
    fleet = Fleet(folder.resolve(), cohorts, 0.0)
    return RunFleet(((PkiSpec("fleet"), fleet),)), first


# A CRL's thisUpdate sits a little before the moment it is issued, so that a verifier whose
# clock is a few seconds behind ours does not see it as coming from the future.
CRL_SLACK = dt.timedelta(minutes=1)


@dataclasses.dataclass
class RunCrls:
    """The CRLs a run publishes for its PKIs, and the serials they revoke so far.

    Files in ``folder``: ``<pki>.pem``, the CRL of the PKI's devices' issuer (an enforcer
    root's ``crl``), and ``chain.pem``, the CRLs of every CA of every trusted PKI (nginx's
    ``ssl_crl``). A PKI whose fleet has no CA keys (provisioned before they were kept) has no
    CRL: :attr:`signed` lists those that do.
    """

    fleet: RunFleet
    folder: Path
    lifetime: dt.timedelta
    revoked: dict[str, set[int]]
    signed: frozenset[str]
    number: int = 0

    @classmethod
    def start(
        cls, fleet: RunFleet, folder: Path, now: dt.datetime, lifetime: dt.timedelta
    ) -> RunCrls:
        """Publish the first CRLs: every ``defect = "revoked"`` device is listed in them."""
        signed = set()
        for spec, pki_fleet in fleet.fleets:
            try:
                fleet_cas(pki_fleet.root)
            except FleetKeysMissing:
                continue
            signed.add(spec.name)
        revoked: dict[str, set[int]] = {spec.name: set() for spec, _ in fleet.fleets}
        for member in fleet.members():
            if member.device.defect == "revoked":
                revoked[member.pki].add(member.serial)
        crls = cls(fleet, folder, lifetime, revoked, frozenset(signed))
        crls.publish(now)
        return crls

    def issuing(self, pki: str) -> Path | None:
        """The CRL file of a PKI's devices' issuer, or None when the PKI has no CRL."""
        return self.folder / f"{pki}.pem" if pki in self.signed else None

    @property
    def chain(self) -> Path | None:
        """The file of every trusted PKI's CRLs, one per CA (None when there are none)."""
        trusted = [spec.name for spec, _ in self.fleet.fleets if spec.trusted]
        return self.folder / "chain.pem" if self.signed.intersection(trusted) else None

    def revoke(self, members: Iterable[Member]) -> set[str]:
        """Add devices to the next CRLs; return the PKIs whose CRLs change."""
        changed = set()
        for member in members:
            if member.serial not in self.revoked[member.pki]:
                self.revoked[member.pki].add(member.serial)
                changed.add(member.pki)
        return changed

    def publish(self, now: dt.datetime) -> None:
        """Issue and write every PKI's CRLs at ``now`` (each file replaced whole)."""
        self.number += 1  # a verifier refuses a CRL numbered below the one it holds
        self.folder.mkdir(parents=True, exist_ok=True)
        chain = []
        for spec, pki_fleet in self.fleet.fleets:
            if spec.name not in self.signed:
                continue
            crls = fleet_crls(
                pki_fleet.root,
                self.revoked[spec.name],
                now - CRL_SLACK,
                next_update=now + self.lifetime,
                number=self.number,
            )
            pems = [c.public_bytes(serialization.Encoding.PEM) for c in crls]
            _replace(self.folder / f"{spec.name}.pem", pems[-1])
            if spec.trusted:
                chain += pems
        if chain:
            _replace(self.folder / "chain.pem", b"".join(chain))

    def pem(self, pki: str) -> str:
        """The current CRL of a PKI's devices' issuer, as PEM text."""
        path = self.issuing(pki)
        if path is None:
            raise FleetKeysMissing(f"the {pki} PKI has no CA keys, hence no CRL")
        return path.read_text()


def _replace(path: Path, data: bytes) -> None:
    # A reader (nginx reloading, an enforcer starting) sees the old file or the new, never half.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
