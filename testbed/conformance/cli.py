"""``testbed conformance``: run the property-based conformance suite against a target.

Exit codes: 0 when no divergence, 1 when any, 2 for bad arguments or a target that cannot be
set up (the message names the option and the problem).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shlex
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import trio

from testbed.conformance.strategies import KNOWN_FAMILIES

EXIT_OK, EXIT_DIVERGENCE, EXIT_USAGE = 0, 1, 2

NGINX_SCOPE = (
    "nginx can express one Valid Certificate rule per hostname (ssl_client_certificate + "
    "ssl_verify_client optional): cases are restricted to that policy and a 24h session, with "
    "no Common Name or other rules, no cookies or tokens, no No Duration, no managed CA or "
    "revocation, no Host/SNI mismatch, and no clock jumps (nginx reads the wall clock, so "
    "validity windows start or end at least a day from now). Keys and signatures stay inside "
    "the validation profile, trust anchors are self-signed roots and SANs are non-critical: "
    "OpenSSL's own profile differs there (it admits Ed25519 CAs, for one). Compared: admitted "
    "or refused (nginx answers 400 to certificates it cannot verify, so reason codes are not "
    "compared)."
)
URL_SCOPE = (
    "A URL target is provisioned through its admin API (account and zone 'conformance'); "
    "its clock cannot be moved, so cases have no clock jumps and validity windows start or "
    "end at least a day from now; the stateful test is skipped. Its max_chain_depth is not "
    "known, so depth is not judged (the cases' chains have at most 3 intermediates)."
)


class UsageError(Exception):
    """A bad option: the message names it and says what is expected."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TESTBED_CONFORMANCE_{name}", default)


def add_conformance_parser(sub: Any) -> None:
    """Register ``testbed conformance`` (every option has a TESTBED_CONFORMANCE_* twin)."""
    p = sub.add_parser(
        "conformance",
        help="check an enforcer against docs/access-flow.md with generated certificates, policies "
        "and clocks",
        description="Property-based conformance: hypothesis generates cases, a reference "
        "model of docs/access-flow.md says what must happen, real TLS connections show what does.",
    )
    p.add_argument(
        "--target",
        default=_env("TARGET", "builtin"),
        help="builtin (our enforcer, in process), nginx (started on loopback), or "
        "https://host:port of an enforcer with this project's admin API "
        "(env TESTBED_CONFORMANCE_TARGET)",
    )
    p.add_argument(
        "--examples",
        default=_env("EXAMPLES", "100"),
        help="generated cases (default 100; env TESTBED_CONFORMANCE_EXAMPLES)",
    )
    p.add_argument(
        "--stateful-examples",
        default=_env("STATEFUL_EXAMPLES"),
        help="runs of the stateful test (default: a fifth of --examples; 0 skips it)",
    )
    p.add_argument("--seed", default=_env("SEED"), help="random seed (default: a new one)")
    p.add_argument("--junit", default=_env("JUNIT"), help="write a JUnit XML report here")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="FAMILY",
        help=f"leave a family of cases out: {', '.join(sorted(KNOWN_FAMILIES))}",
    )
    p.add_argument(
        "--shrink-seconds",
        default=_env("SHRINK_SECONDS", "60"),
        help="time budget for shrinking each failure to a small case (default 60)",
    )
    p.add_argument("--workdir", default=_env("WORKDIR"), help="keep generated files here")
    p.add_argument(
        "--http2",
        action="store_true",
        default=_env("HTTP2", "") not in ("", "0"),
        help="send every case over HTTP/2 streams (ALPN h2) instead of HTTP/1.1; Host becomes "
        ":authority, so Host != SNI cases check connection coalescing (env "
        "TESTBED_CONFORMANCE_HTTP2=1)",
    )
    url = p.add_argument_group("URL targets")
    url.add_argument("--ca", default=_env("CA"), help="PEM that verifies the target's certificate")
    url.add_argument("--admin-url", default=_env("ADMIN_URL"), help="the target's admin API URL")
    url.add_argument(
        "--admin-token",
        default=_env("ADMIN_TOKEN"),
        help="admin API bearer token (env TESTBED_CONFORMANCE_ADMIN_TOKEN)",
    )
    url.add_argument(
        "--origin",
        default=_env("ORIGIN", "http://127.0.0.1:9"),
        help="origin for the applications the suite creates on a URL target",
    )
    # Tests run the suite against deliberately broken enforcers through the real CLI path.
    p.add_argument("--mutant", default=None, help=argparse.SUPPRESS)


@dataclasses.dataclass(frozen=True)
class Options:
    """Checked options."""

    target: str
    examples: int
    stateful_examples: int
    seed: int
    junit: Path | None
    skip: frozenset[str]
    shrink_seconds: float
    workdir: Path | None
    mutant: str | None
    url: Any = None
    transport: str = "http1"


def _int(value: str | None, option: str, minimum: int) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise UsageError(f"{option}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise UsageError(f"{option}: expected {minimum} or more, got {number}")
    return number


def check_options(args: argparse.Namespace) -> Options:
    """Check every option; raise :class:`UsageError` naming the first bad one."""
    from testbed.conformance.mutants import MUTANTS
    from testbed.conformance.targets import UrlSettings

    examples = _int(args.examples, "--examples", 1)
    stateful = (
        max(1, examples // 5)
        if args.stateful_examples is None
        else _int(args.stateful_examples, "--stateful-examples", 0)
    )
    seed = random.randrange(2**32) if args.seed is None else _int(args.seed, "--seed", 0)
    for family in args.skip:
        if family not in KNOWN_FAMILIES:
            raise UsageError(
                f"--skip: unknown family {family!r}; expected one of {sorted(KNOWN_FAMILIES)}"
            )
    try:
        shrink = float(args.shrink_seconds)
    except ValueError:
        raise UsageError(
            f"--shrink-seconds: expected seconds, got {args.shrink_seconds!r}"
        ) from None
    junit = Path(args.junit) if args.junit else None
    if junit is not None and not junit.parent.is_dir():
        raise UsageError(f"--junit: folder {junit.parent} does not exist")
    if args.mutant is not None and args.mutant not in MUTANTS:
        raise UsageError(f"--mutant: unknown {args.mutant!r}; expected one of {sorted(MUTANTS)}")
    target = args.target
    url = None
    if target not in ("builtin", "nginx"):
        if not target.startswith("https://"):
            raise UsageError(
                f"--target: expected builtin, nginx or https://host:port, got {target!r}"
            )
        missing = [
            o
            for o, v in (
                ("--ca", args.ca),
                ("--admin-url", args.admin_url),
                ("--admin-token", args.admin_token),
            )
            if not v
        ]
        if missing:
            raise UsageError(f"{missing[0]}: required with a URL target (see README, Conformance)")
        url = UrlSettings(target, Path(args.ca), args.admin_url, args.admin_token, args.origin)
    if args.mutant is not None and target != "builtin":
        raise UsageError("--mutant: only the builtin target can be mutated")
    if args.http2 and target == "nginx":
        raise UsageError(
            "--http2: the nginx target is HTTP/1.1 only (nginx does not refuse an :authority "
            "that differs from the SNI, so coalescing cases would all diverge)"
        )
    return Options(
        target=target,
        examples=examples,
        stateful_examples=stateful,
        seed=seed,
        junit=junit,
        skip=frozenset(args.skip),
        shrink_seconds=shrink,
        workdir=Path(args.workdir) if args.workdir else None,
        mutant=args.mutant,
        url=url,
        transport="h2" if args.http2 else "http1",
    )


def reproduce_command(opts: Options) -> str:
    """The command line that replays this run."""
    cmd = ["testbed", "conformance", "--target", opts.target, "--examples", str(opts.examples)]
    cmd += ["--stateful-examples", str(opts.stateful_examples), "--seed", str(opts.seed)]
    for family in sorted(opts.skip):
        cmd += ["--skip", family]
    if opts.transport == "h2":
        cmd.append("--http2")
    return shlex.join(cmd)


async def _run_target(opts: Options, folder: Path) -> list[Any]:
    """Start the target, run the properties in a worker thread, stop the target."""
    from testbed.conformance.mutants import applied
    from testbed.conformance.suite import check_cases, check_stateful
    from testbed.conformance.targets import NginxTarget, TargetError, serve_builtin, url_target

    def properties(target: Any) -> list[Any]:
        target.caps = dataclasses.replace(target.caps, skip=opts.skip, transport=opts.transport)
        results = [
            check_cases(target, opts.examples, opts.seed, shrink_seconds=opts.shrink_seconds)
        ]
        if opts.stateful_examples:
            results.append(
                check_stateful(
                    target, opts.stateful_examples, opts.seed, shrink_seconds=opts.shrink_seconds
                )
            )
        return results

    results: list[Any] = []
    failure: Exception | None = None
    with applied(opts.mutant):
        async with trio.open_nursery() as nursery:
            target: Any = None
            try:
                if opts.target == "builtin":
                    target = await serve_builtin(nursery, folder)
                elif opts.target == "nginx":
                    target = NginxTarget(folder)
                else:
                    target = await trio.to_thread.run_sync(url_target, opts.url, folder)
                results = await trio.to_thread.run_sync(properties, target)
            except (TargetError, RuntimeError) as exc:
                # Raised outside the nursery, so the caller sees it, not an exception group.
                failure = exc
            finally:
                if isinstance(target, NginxTarget):
                    await target.aclose()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return results


def write_junit(path: Path, opts: Options, results: list[Any], seconds: float) -> None:
    """A JUnit XML file: one test case per property, a failure per divergence."""
    failures = sum(1 for r in results if r.divergences)
    errors = sum(1 for r in results if r.error)
    suite = ET.Element(
        "testsuite",
        name=f"conformance[{opts.target}]",
        tests=str(len(results)),
        failures=str(failures),
        errors=str(errors),
        time=f"{seconds:.2f}",
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="seed", value=str(opts.seed))
    ET.SubElement(props, "property", name="reproduce", value=reproduce_command(opts))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"conformance.{opts.target}", name=r.name)
        if r.divergences:
            failure = ET.SubElement(
                case, "failure", message=f"{len(r.divergences)} divergence(s) from the model"
            )
            failure.text = "\n\n".join(r.divergences) + f"\n\nreproduce: {reproduce_command(opts)}"
        elif r.error:
            ET.SubElement(case, "error", message=r.error).text = r.error
        elif r.examples == 0:
            ET.SubElement(case, "skipped", message=r.description)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


def run_conformance(args: argparse.Namespace) -> int:
    """Run ``testbed conformance``; return the exit code."""
    from testbed.conformance.targets import TargetError

    try:
        opts = check_options(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout
    print(
        f"conformance: target {opts.target}, {opts.examples} cases, seed {opts.seed}; "
        "rules: docs/access-flow.md",
        file=out,
    )
    if opts.mutant:
        print(f"conformance: MUTANT enforcer: {opts.mutant}", file=out)
    if opts.target == "nginx":
        print(f"scope: {NGINX_SCOPE}", file=out)
    elif opts.url is not None:
        print(f"scope: {URL_SCOPE}", file=out)
    if opts.skip:
        print(f"skipped families: {', '.join(sorted(opts.skip))}", file=out)
    out.flush()
    started = time.monotonic()
    try:
        if opts.workdir is not None:
            opts.workdir.mkdir(parents=True, exist_ok=True)
            results = trio.run(_run_target, opts, opts.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
                results = trio.run(_run_target, opts, Path(tmp))
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:  # nginx missing or failing to start
        print(f"error: --target {opts.target}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seconds = time.monotonic() - started
    for r in results:
        state = "ok" if r.passed else ("ERROR" if r.error else "DIVERGED")
        if r.passed and r.examples == 0:
            state = "skipped"
        print(f"[{state}] {r.name}: {r.description} ({r.examples} runs)", file=out)
        for i, text in enumerate(r.divergences, start=1):
            print(f"\n--- divergence {i} in {r.name} ---\n{text}", file=out)
        if r.error:
            print(f"    error: {r.error}", file=out)
    failed = any(not r.passed for r in results)
    if failed:
        print(f"\nreproduce: {reproduce_command(opts)}", file=out)
    verdict = "no divergence"
    if any(r.divergences for r in results):
        verdict = "divergences found"
    elif failed:
        verdict = "errors (no divergence found)"
    print(f"conformance: {verdict} in {seconds:.1f}s", file=out)
    if opts.junit is not None:
        write_junit(opts.junit, opts, results, seconds)
    return EXIT_DIVERGENCE if failed else EXIT_OK
