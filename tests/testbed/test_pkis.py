"""Several PKIs in one scenario: trusted ones, one bound to another hostname, a root removed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from enforcer.config import load_config
from testbed.scenario import ScenarioError, load_scenario
from tests.testbed.test_run import run_cli

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "multi-pki.toml"


def test_three_pkis_and_a_root_removed_mid_run(tmp_path: Path) -> None:
    result = run_cli("run", str(SCENARIO), "--reports", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = next(tmp_path.glob("multi-pki-*"))
    # One fleet per PKI, each with its own key type and chain length.
    for pki in ("factory-a", "factory-b", "acquired"):
        assert (run_dir / "fleets" / pki / "inventory.sqlite").exists()
    config = load_config(run_dir / "enforcer.toml")
    bound = {r.name: r.associated_hostnames for r in config.roots}
    assert bound["factory-a root"] == bound["factory-b root"] == ("auth.example.test",)
    assert bound["acquired root"] == ("acquired.elsewhere.invalid",)

    con = sqlite3.connect(run_dir / "results.sqlite")
    try:
        rows = con.execute(
            "SELECT cohort, outcome, min(started), max(started) FROM attempts GROUP BY 1, 2"
        ).fetchall()
        mismatches = con.execute("SELECT count(*) FROM attempts WHERE outcome != expected")
        assert mismatches.fetchone()[0] == 0
    finally:
        con.close()
    seen = {(cohort, outcome): (first, last) for cohort, outcome, first, last in rows}
    assert ("line-a", "allowed") in seen and (
        "line-a-expired",
        "denied:certificate_expired",
    ) in seen
    # A root of another hostname authorises nothing here, an expired leaf included.
    assert {o for c, o in seen if c.startswith("acquired")} == {"denied:untrusted_issuer"}
    # factory-b's root leaves the hostname at 3 h: its devices get in before, not after.
    allowed = seen[("line-b", "allowed")]
    refused = seen[("line-b", "denied:untrusted_issuer")]
    assert allowed[1] < 3 * 3600 <= refused[0]
    assert ("line-b-missing", "denied:missing_intermediate") in seen


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (
            ('pki = "factory-a"\nsize = 4', 'pki = "factory-c"\nsize = 4'),
            "cohorts[0].pki",
            "not one",
        ),
        (("intermediates = 2", "intermediates = 4"), "pkis[1].intermediates", "between 0 and 3"),
        (('name = "acquired"\ntrusted', 'name = "factory-a"\ntrusted'), "pkis", "repeat"),
        (('pki = "factory-b"\nEOF', 'pki = "acquired"\nEOF'), "events[0].pki", "only rotate_root"),
        (("trusted = false", "trusted = 3"), "pkis[2].trusted", "true or false"),
    ],
)
def test_broken_pkis_name_the_field(
    tmp_path: Path, change: tuple[str, str], field: str, problem: str
) -> None:
    text = SCENARIO.read_text() + "EOF"
    assert change[0] in text
    path = tmp_path / "broken.toml"
    path.write_text(text.replace(change[0], change[1]).removesuffix("EOF"))
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert f"{path}: {field}: " in str(err.value)
    assert problem in str(err.value)
