"""docs/access-flow.md is the contract: every reason code, every cited rule id, no outside spec.

The rules the enforcer implements live in the repository, in ``docs/access-flow.md``. These
checks keep the document and the code from drifting apart: a reason code added to
``enforcer/reasons.py`` must be documented with its HTTP status, a rule id cited anywhere in the
code, tests, benchmarks or README must be defined there, and nothing may point at a
specification outside the repository.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from enforcer.reasons import DENIAL_BODIES, Reason
from testbed.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "access-flow.md"
SCANNED = ("enforcer", "devices", "testbed", "tests", "bench", "scenarios", "docs")
SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini"}

# A rule id: a topic letter and a number (A7, V10, F3).
RULE_ID = r"[A-Z]\d{1,2}"
# "access-flow A7", "access-flow A2-A9", "access-flow A1, A5", "access-flow A4/A9 and V1".
CITATION = re.compile(rf"access-flow\s+({RULE_ID}(?:\s*(?:-|,|/|and)\s*{RULE_ID})*)")
# The original flow's ids are also cited bare ("A5: ...", "(A9)") in the conformance model.
BARE_A = re.compile(r"\bA\d{1,2}\b")
# A reference to the specification that used to live outside the repository (``[P]`` keeps
# this line itself out of a plain grep for the old name).
OUTSIDE_REFERENCE = re.compile(r"S[P]EC\.md|\bS[P]EC\b|shared/S[P]EC|\.\./shared")


def project_files() -> Iterator[Path]:
    """The project's text files (README, Makefile, and the scanned trees), never .venv."""
    yield ROOT / "README.md"
    yield ROOT / "Makefile"
    yield ROOT / "pyproject.toml"
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                yield path


def defined_ids() -> list[str]:
    """Rule ids the document defines: each rule starts a paragraph with ``**ID Title.**``."""
    return re.findall(rf"^\*\*({RULE_ID}) ", DOC.read_text(), flags=re.MULTILINE)


def cited_ids(text: str) -> set[str]:
    """Every rule id ``text`` cites."""
    ids = set(BARE_A.findall(text))
    for match in CITATION.finditer(text):
        ids |= set(re.findall(RULE_ID, match.group(1)))
    return ids


def reason_rows() -> dict[str, str]:
    """The reason-code table of the document: code -> status column."""
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", DOC.read_text(), flags=re.MULTILINE)
    return {code: status.strip() for code, status in rows}


def test_the_document_is_in_the_repository() -> None:
    assert DOC.is_file(), "docs/access-flow.md is the project's contract; it must exist"


def test_rule_ids_are_unique_and_keep_a1_to_a14() -> None:
    ids = defined_ids()
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert {f"A{n}" for n in range(1, 15)} <= set(ids)


def test_every_reason_code_is_documented_with_its_status() -> None:
    rows = reason_rows()
    for reason in Reason:
        assert reason.value in rows, f"{reason.value} is missing from docs/access-flow.md D1"
        if reason not in DENIAL_BODIES:
            # Noted in the access log only (token_invalid, token_expired): never a status.
            expected = "none"
        elif reason is Reason.MISDIRECTED:
            expected = "421"
        elif reason is Reason.NO_APPLICATION:
            expected = "404"
        elif reason is Reason.LOGIN_REQUIRED:
            expected = "401"
        elif reason is Reason.LOGIN_FAILED:
            expected = "400"
        else:
            expected = "403"
        assert rows[reason.value] == expected, (reason.value, rows[reason.value])


def test_every_reason_code_has_its_grpc_status_in_d4() -> None:
    from enforcer.reasons import GRPC_STATUS

    rows = re.findall(r"^\| (\d+) `[A-Z_]+` \| ([^|]+) \|", DOC.read_text(), flags=re.MULTILINE)
    documented = {
        code: int(status) for status, codes in rows for code in re.findall(r"`([a-z_]+)`", codes)
    }
    assert documented == {r.value: GRPC_STATUS[r] for r in Reason}


def test_every_cited_rule_id_is_defined() -> None:
    defined = set(defined_ids())
    missing = {}
    for path in project_files():
        if path in (DOC, Path(__file__).resolve()):
            continue
        unknown = cited_ids(path.read_text(errors="replace")) - defined
        if unknown:
            missing[str(path.relative_to(ROOT))] = sorted(unknown)
    assert not missing, f"rule ids cited but not defined in docs/access-flow.md: {missing}"


def test_the_document_cites_only_its_own_ids() -> None:
    text = DOC.read_text()
    assert cited_ids(text) - set(defined_ids()) == set()
    for match in re.finditer(rf"\b({RULE_ID})(?:-({RULE_ID}))?\b", text):
        for rule in filter(None, match.groups()):
            if rule[0] in "ATHVPJSRFLOD":
                assert rule in defined_ids(), f"docs/access-flow.md cites {rule}, never defined"


def test_nothing_points_at_a_spec_outside_the_repository() -> None:
    found = []
    for path in project_files():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE_REFERENCE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "point these at docs/access-flow.md:\n" + "\n".join(found)


def test_readme_points_at_the_document() -> None:
    assert "docs/access-flow.md" in (ROOT / "README.md").read_text()


def test_conformance_help_names_the_document(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["conformance", "--help"])
    assert exited.value.code == 0
    assert "docs/access-flow.md" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "docs/access-flow.md" in capsys.readouterr().out
