"""Instructions per full mTLS handshake, counted by callgrind: the enforcer against nginx.

Wall-clock and CPU-time figures on this shared 2-core machine move by 10-30 % between runs,
which hides changes of a few percent. callgrind counts the instructions a process executes,
and that count does not depend on what else the machine is doing, so this bench gives the
same figure twice and can judge one change of the hot path against another (``--baseline``).
Instructions are not time (crypto code retires more instructions per cycle than the Python
interpreter), so the ratio here and the ratio of ``handshakes.py`` differ; both are printed by
``make bench``.

Each server runs alone under ``valgrind --tool=callgrind --instr-atstart=no``, one process
(the enforcer with 1 worker; nginx with ``master_process off``), same fleet, same config as
``handshakes.py``. One client makes every device's first handshake uninstrumented (so the
enforcer's validation cache holds every device, as in the fleet's steady state), then
``callgrind_control -i on``, then ``--requests`` full handshakes one after the other (new
connection, certificate + intermediate, ``GET /`` with ``Connection: close``), then a
dump (``callgrind_control -d``): the dump's total divided by the requests is the
figure. The echo origin the enforcer forwards to runs outside valgrind and is not counted.

    .venv/bin/python bench/instructions.py [--requests 200] [--baseline OTHER/testbed]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    ANSWER,
    NGINX,
    NGINX_CONF,
    Testbed,
    client_context,
    free_port,
    full_handshake_request,
    make_testbed,
    nginx_missing,
    program_missing,
    start_origin,
    stop,
    wait_port,
)
from rich.console import Console
from rich.table import Table

from testbed.demo import AUTH_HOST

REQUEST = f"GET / HTTP/1.1\r\nHost: {AUTH_HOST}\r\nConnection: close\r\n\r\n".encode()
# --trace-children: a baseline may be a script that execs Python.
VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--vgdb=yes"]
VALGRIND.append("--trace-children=yes")


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _total(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if m := re.match(r"(?:summary|totals):\s+(\d+)", line):
            return int(m.group(1))
    raise SystemExit(f"{dump}: no summary line")


def count(name: str, cmd: list[str], port: int, bed: Testbed, requests: int) -> dict[str, Any]:
    """Start ``cmd`` under callgrind, warm it with the fleet, count ``requests`` handshakes."""
    out = bed.tmp / f"callgrind-{name}"
    out.mkdir()
    err = (out / "stderr").open("wb")
    proc = subprocess.Popen(
        [*VALGRIND, f"--callgrind-out-file={out}/callgrind.%p", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    try:
        wait_port(port, lambda: proc.poll() is None, name, timeout=600)
        contexts = [client_context(c, k, bed.edge_ca) for c, k in bed.devices]
        for ctx in contexts:  # every device once, uninstrumented
            if (status := full_handshake_request(ctx, port, REQUEST)) != 200:
                raise SystemExit(f"{name}: warm-up request answered {status}")
        _control(proc.pid, "-i", "on")
        start = time.perf_counter()
        for i in range(requests):
            status = full_handshake_request(contexts[i % len(contexts)], port, REQUEST)
            if status != 200:
                raise SystemExit(f"{name}: request {i} answered {status}")
        wall = time.perf_counter() - start
        _control(proc.pid, "-d")  # the counts since "-i on", in <file>.1
        dump = out / f"callgrind.{proc.pid}.1"
        deadline = time.monotonic() + 60
        while not (dump.exists() and "summary:" in dump.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: callgrind wrote no dump {dump}")
            time.sleep(0.2)
        total = _total(dump)
    finally:
        stop(proc)
        err.close()
    return {
        "instructions_per_request": round(total / requests),
        "requests": requests,
        "wall_s_under_valgrind": round(wall, 1),
    }


def main() -> int:
    """Count, print a table, one JSON line and the rerun command."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=200, help="counted handshakes per server")
    ap.add_argument("--fleet", type=int, default=50, help="distinct devices (50)")
    ap.add_argument("--baseline", help="another build's testbed executable, counted too")
    ap.add_argument("--skip-nginx", action="store_true", help="count the enforcer(s) only")
    ap.add_argument("--keep", help="copy the callgrind dumps here (for callgrind_annotate)")
    args = ap.parse_args()
    if args.requests < 1 or args.fleet < 1:
        ap.error("--requests and --fleet: expected 1 or more")
    if args.baseline and not os.access(args.baseline, os.X_OK):
        ap.error(f"--baseline: {args.baseline} is not an executable file")
    if missing := program_missing("/usr/bin/callgrind_control", "valgrind"):
        raise SystemExit(missing)
    if not args.skip_nginx and (missing := nginx_missing()):
        raise SystemExit(missing)
    console = Console(soft_wrap=True, highlight=False)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        port, origin_port = free_port(), free_port()
        bed = make_testbed(Path(tmp), args.fleet, port, origin_port)
        origin = start_origin(origin_port)
        try:
            targets: list[tuple[str, list[str]]] = []
            exe = str(Path(sys.executable).with_name("testbed"))
            serve = ["enforcer", "serve", "--config", str(bed.layout.config)]
            serve += ["--port", str(port), "--workers", "1"]
            targets.append(("enforcer", [exe, *serve]))
            if args.baseline:
                targets.append(("baseline", [args.baseline, *serve]))
            if not args.skip_nginx:
                ndir = Path(tmp) / "nginx"
                ndir.mkdir()
                conf = NGINX_CONF.format(
                    workers=1, tmp=ndir, host="127.0.0.1", port=port, server_name=AUTH_HOST,
                    edge=bed.layout.root / "edge", client_ca=bed.fleet_root,
                    origin_port=origin_port, answer=ANSWER,
                ).replace("master_process on", "master_process off")  # fmt: skip
                (ndir / "nginx.conf").write_text(conf, encoding="utf-8")
                targets.append(("nginx", [NGINX, "-p", str(ndir), "-c", str(ndir / "nginx.conf")]))
            for name, cmd in targets:
                console.print(f"counting {name} ({args.requests} handshakes under callgrind) ...")
                figures[name] = count(name, cmd, port, bed, args.requests)
                if args.keep:
                    for dump in (Path(tmp) / f"callgrind-{name}").glob("callgrind.*.1"):
                        Path(args.keep).mkdir(parents=True, exist_ok=True)
                        shutil.copy(dump, Path(args.keep) / f"{name}.callgrind")
        finally:
            origin.kill()

    table = Table(title=f"Instructions per full mTLS handshake (callgrind, {args.requests} each)")
    for col in ("server", "instructions per request", "ratio nginx / server"):
        table.add_column(col, justify="left" if col == "server" else "right")
    nginx = figures.get("nginx", {}).get("instructions_per_request")
    for name, fig in figures.items():
        ipr = fig["instructions_per_request"]
        table.add_row(name, f"{ipr:,}", f"{nginx / ipr:.3f}" if nginx else "-")
    console.print(table)
    record: dict[str, Any] = {
        "bench": "instructions",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fleet": args.fleet,
        **figures,
    }
    if nginx:
        record["ratio"] = round(nginx / figures["enforcer"]["instructions_per_request"], 3)
    if "baseline" in figures:
        base = figures["baseline"]["instructions_per_request"]
        record["enforcer_vs_baseline"] = round(
            figures["enforcer"]["instructions_per_request"] / base, 3
        )
        console.print(f"enforcer / baseline instructions: {record['enforcer_vs_baseline']}")
    print(json.dumps(record, separators=(",", ":")), flush=True)
    print(f"rerun: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
