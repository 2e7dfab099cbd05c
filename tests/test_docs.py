"""docs/reliability.md explains every reliability case code used in tests/, and names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
TESTS = ROOT / "tests"

CODE = re.compile(r"\b[A-Z][0-9]{1,2}\b")
CODE_IN_TEST_NAME = re.compile(r"\bdef test_([a-z][0-9]{1,2})_")
DOC_ROW = re.compile(r"^\| ([A-Z][0-9]{1,2}) \|", re.M)
# The same shape with another meaning (docs/reliability.md, "Look-alikes"): run B's halves, prompt texts,
# the F1 metric, a safetensors dtype.
NOT_CASES = {"B1", "B2", "P0", "P1", "P2", "P3", "P4", "F1", "F32"}


def codes_in(text: str) -> set[str]:
    return (set(CODE.findall(text)) | {c.upper() for c in CODE_IN_TEST_NAME.findall(text)}) - NOT_CASES


def undocumented(sources: dict[str, str], doc: str) -> dict[str, list[str]]:
    """Each code used in `sources` (name -> text) without a table row in `doc`, with where it is used."""
    rows = set(DOC_ROW.findall(doc))
    missing: dict[str, list[str]] = {}
    for name, text in sorted(sources.items()):
        for code in sorted(codes_in(text) - rows):
            missing.setdefault(code, []).append(name)
    return missing


def test_every_case_code_used_in_tests_has_a_row_in_docs_reliability_md():
    # this file plants made-up codes in its control below
    sources = {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
        for p in sorted(TESTS.rglob("*.py"))
        if p != Path(__file__).resolve()
    }
    missing = undocumented(sources, DOC.read_text(encoding="utf-8"))
    assert not missing, f"codes without a row in docs/reliability.md (look-alikes go to NOT_CASES): {missing}"


def test_control_a_new_code_and_a_code_only_in_a_test_name_are_reported():
    doc = "| R1 | a fault | what holds | tests |\n"
    sources = {"a.py": '"""R1 and Z7."""\ndef test_q12_something(): ...\n', "b.py": "dtype F32, run B1"}
    assert undocumented(sources, doc) == {"Z7": ["a.py"], "Q12": ["a.py"]}


def test_the_files_and_tests_the_doc_names_exist():
    doc = DOC.read_text(encoding="utf-8")
    files = set(re.findall(r"\b(?:tests|benchmarks)/[\w/]+\.py\b", doc))
    assert files and not [f for f in files if not (ROOT / f).is_file()]
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in TESTS.rglob("*.py")), re.M))
    named = set(re.findall(r"(?:`|::)(test_\w+?)(_\*)?`", doc))
    gone = [
        name + star
        for name, star in named
        if not (any(d.startswith(name + "_") for d in defined) if star else name in defined)
    ]
    assert not gone, f"docs/reliability.md names tests that do not exist: {gone}"
