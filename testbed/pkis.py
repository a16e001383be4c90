"""A run's PKIs: one provisioned fleet per CA hierarchy a scenario declares.

A scenario without ``[[pkis]]`` has one PKI, ``fleet``, provisioned into ``RUN_DIR/fleet`` as
before; with several, each goes to ``RUN_DIR/fleets/<name>``. A trusted PKI's root is
associated with the target's hostname; an untrusted one is known to the enforcer but bound to
another hostname, so its devices are refused with ``untrusted_issuer`` (access-flow A5: a root
authorises client certificates only for its own hostnames).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from pathlib import Path

from devices.provision import Cohort, Fleet, provision, read_inventory
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
            if c.pki == pki.name
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
