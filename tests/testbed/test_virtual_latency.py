"""Virtual runs simulate the network: latencies count round trips, not 0 ms.

A virtual run talks to its embedded enforcer over in-memory streams on trio's MockClock. With
``network = { rtt = ... }`` every flight of bytes arrives half a round trip later (virtual
time, no wall time), so a new connection costs a round trip (TCP), the TLS 1.3 handshake one
more (the client is done once its Finished is sent) and a request one; without it, or with
``rtt = "0s"``, delivery is instant as before.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.scenario import ScenarioError, load_scenario

ROOT = Path(__file__).resolve().parents[2]
RTT_MS = 40.0

SCENARIO = """
name = "{name}"
seed = 3
clock = "virtual"
thresholds = ["false_accepts == 0"]
{network}

[target]
kind = "embedded"

[[cohorts]]
name = "fresh"
size = 4
# A full handshake for every request: each attempt shows connect, handshake and first byte.
client = {{ always_new_handshake = true, resume_sessions = false }}

[[phases]]
name = "steady"
duration = "20s"
arrival = "constant"
rate = 2
"""


def run_virtual(tmp_path: Path, name: str, network: str) -> tuple[dict, list[tuple]]:
    """Run the scenario through the CLI; return summary.json and its outcome counts."""
    path = tmp_path / f"{name}.toml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(SCENARIO.format(name=name, network=network))
    reports = tmp_path / "reports"
    args = ["run", str(path), "--reports", str(reports), "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (run_dir,) = reports.glob(f"{name}-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    con = sqlite3.connect(run_dir / "results.sqlite")
    counts = sorted(con.execute("SELECT outcome, count(*) FROM attempts GROUP BY 1"))
    con.close()
    return summary, counts


def latencies(summary: dict) -> dict:
    """The summary's latency table (ms)."""
    return summary["latency"]


def test_a_virtual_round_trip_time_shows_in_the_latencies(tmp_path: Path) -> None:
    slow, slow_counts = run_virtual(tmp_path, "rtt40", 'network = { rtt = "40ms" }')
    instant, instant_counts = run_virtual(tmp_path, "rtt0", 'network = { rtt = "0s" }')
    lat = latencies(slow)
    # Software keys cost nothing simulated: what remains is the network's round trips.
    assert lat["connect"]["p50"] == pytest.approx(RTT_MS, abs=1)
    assert RTT_MS - 1 <= lat["handshake"]["p50"] <= 2 * RTT_MS
    assert lat["first_byte"]["p50"] == pytest.approx(RTT_MS, abs=1)
    assert 3 * RTT_MS - 1 <= lat["total"]["p50"] <= 4 * RTT_MS
    zero = latencies(instant)
    for name in ("connect", "handshake", "first_byte", "total"):
        assert zero[name]["p50"] == 0, name
    # The network slows attempts down; it does not change what they get.
    assert slow_counts == instant_counts == [("allowed", 40)]


def test_a_virtual_run_has_a_modest_round_trip_by_default(tmp_path: Path) -> None:
    summary, counts = run_virtual(tmp_path, "default", "")
    lat = latencies(summary)
    assert lat["connect"]["p50"] == pytest.approx(20.0, abs=1)
    assert lat["first_byte"]["p50"] == pytest.approx(20.0, abs=1)
    assert counts == [("allowed", 40)]
    (run_dir,) = (tmp_path / "reports").glob("default-*")
    con = sqlite3.connect(run_dir / "results.sqlite")
    (meta,) = con.execute("SELECT value FROM run WHERE key = 'network'").fetchone()
    con.close()
    assert json.loads(meta) == {"rtt": 0.02, "jitter": 0.0}


def test_jitter_is_drawn_from_the_seed(tmp_path: Path) -> None:
    net = 'network = { rtt = "40ms", jitter = "20ms" }'
    first, _ = run_virtual(tmp_path / "a", "jit", net)
    again, _ = run_virtual(tmp_path / "b", "jit", net)
    a, b = latencies(first), latencies(again)
    assert a["handshake"]["p50"] != RTT_MS  # jittered
    assert 20 <= a["first_byte"]["p50"] <= 60
    assert a["first_byte"] == b["first_byte"] and a["connect"] == b["connect"]


@pytest.mark.parametrize(
    ("network", "clock", "field", "problem"),
    [
        ('network = { rtt = "fast" }', "virtual", "network.rtt", "not a Go duration"),
        (
            'network = { rtt = "10ms", jitter = "20ms" }',
            "virtual",
            "network.jitter",
            "above the rtt",
        ),
        ('network = { rtt = "10ms", loss = 1 }', "virtual", "network.loss", "unknown field"),
        ('network = { rtt = "10ms" }', "real", "network", 'needs clock = "virtual"'),
    ],
)
def test_a_wrong_network_names_the_field(
    tmp_path: Path, network: str, clock: str, field: str, problem: str
) -> None:
    path = tmp_path / "net.toml"
    path.write_text(
        SCENARIO.format(name="net", network=network).replace(
            'clock = "virtual"', f'clock = "{clock}"'
        )
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.field == field
    assert problem in info.value.problem


def test_bytes_sent_to_a_closed_end_do_not_lose_what_it_sent_before() -> None:
    # A server that answers, sends GOAWAY and closes (HTTP/2 No Duration) while the client
    # still sends (a WINDOW_UPDATE): the client reads the answer, then EOF, as over TCP.
    import random

    import trio
    import trio.testing

    from testbed.network import Network, link_pair

    async def main() -> list[bytes]:
        client, server = link_pair(Network(rtt=0.040), random.Random(1))
        await server.send_all(b"response")
        await server.aclose()
        await client.send_all(b"late")  # taken, never delivered
        return [await client.receive_some(), await client.receive_some()]

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == [b"response", b""]
