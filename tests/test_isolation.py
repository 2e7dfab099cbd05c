"""Tests keep out of the user's files: each test has its own TUNESMITH_HOME (tokenizer caches, model
conversions), a fixture of wider scope has a session one, and CLI subprocesses inherit the test's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability._harness import ENV

from tunesmith.paths import home

PRINT_HOME = "from tunesmith.paths import home; print(home())"


@pytest.fixture(scope="module")
def module_home() -> Path:
    return home()


def _under_basetemp(path: Path, tmp_path_factory) -> bool:
    return path.resolve().is_relative_to(tmp_path_factory.getbasetemp().resolve())


@pytest.mark.parametrize("run", range(2))
def test_each_test_has_a_fresh_home_of_its_own(run, tunesmith_home, tmp_path_factory, module_home):
    assert home() == tunesmith_home == Path(os.environ["TUNESMITH_HOME"])
    assert _under_basetemp(home(), tmp_path_factory) and not home().exists()
    assert home() != module_home and _under_basetemp(module_home, tmp_path_factory)  # wider scope: its own


def test_a_cli_subprocess_inherits_the_tests_home(tunesmith_home):
    """_harness.ENV is read when a child starts, not when the module was imported."""
    out = subprocess.run([sys.executable, "-c", PRINT_HOME], env=ENV, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == tunesmith_home
    assert {**ENV}["OMP_NUM_THREADS"] == "1"
