"""What the fuzz modules (test_fuzz_config, test_fuzz_data) share: one Hypothesis profile, the tally of
inputs per property, and the judge of an outcome.

The property is that any config or data input ends in a valid result or our clean error (UserError), never
in another exception: any other exception fails the property test. Each bug the properties found has its own
deterministic test beside the property that found it. Hypothesis runs derandomized and without an example
database: the modules give the same inputs every run, and they write nothing into the repository. The tally
(STATS) is printed at the end of the session by tests/conftest.py, so one can see how many inputs each
property turned into valid results and how many it refused; no test depends on it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from tunesmith.errors import UserError

torch.set_num_threads(1)

EXAMPLES = 400  # per property: 2,800 inputs in all, about 30 s on one thread
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)

STATS: dict[str, Counter] = {}  # property -> outcomes; a report only (see the module docstring)
MARK = "ZQX"  # put into row text: problem messages must never contain it


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def outcome(stats: Counter, fn):
    """Run fn: a result, or our UserError (exit 2, non-empty message); any other exception propagates."""
    stats["inputs"] += 1
    try:
        result = fn()
    except UserError as err:
        assert err.exit_code == 2 and err.render().strip()
        stats["user_error"] += 1
        return None
    stats["valid"] += 1
    return result
