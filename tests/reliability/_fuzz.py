"""What the fuzz modules (test_fuzz_config, test_fuzz_data) share: one Hypothesis profile, the tally of
inputs per property, and the judge of an outcome.

The property is that any config or data input ends in a valid result or our clean error (UserError), never
in another exception. Inputs that hit a bug found by fuzzing are tallied by a narrow signature (exception
type + message + the tunesmith file it came from) instead of failing the property, so that one known bug
does not hide the next; each such bug has its own deterministic test beside the property that found it
(then drop its signature from KNOWN_BUGS once it is fixed). Hypothesis runs derandomized and without an
example database: the modules alone give the same inputs every run (counts can shift a little when other
test modules run first), and they write nothing into the repository.
"""

from __future__ import annotations

import re
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from tunesmith.errors import UserError

torch.set_num_threads(1)

EXAMPLES = 400  # per property: 2,800 inputs in all, about 30 s on one thread
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

STATS: dict[str, Counter] = {}  # one tally for both modules: test_zz_fuzz_input_counts prints it
MARK = "ZQX"  # put into row text: problem messages must never contain it


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# (tag, exception types, message regex, tunesmith file it passes through, library file it comes from)
ANY = (ValueError, IndexError, KeyError, AttributeError, TypeError, RecursionError, OverflowError)
KNOWN_BUGS = [
    ("yaml.safe_load raises a non-YAMLError", ANY, r"", "tunesmith/config.py", "/yaml/"),
    ("path: NUL byte", (ValueError,), r"embedded null byte", "tunesmith/security.py", ""),
    ("path: ~unknownuser", (RuntimeError,), r"Could not determine home directory", "tunesmith/security.py", ""),
    ("json.loads raises a non-JSONDecodeError", (ValueError, RecursionError), r"integer string conversion|recursion",
     "tunesmith/data/sources.py", ""),
]


def known_bug(err: BaseException) -> str | None:
    files = [f.filename.replace("\\", "/") for f in traceback.extract_tb(err.__traceback__)]
    for tag, kinds, pattern, origin, library in KNOWN_BUGS:
        if (isinstance(err, kinds) and re.search(pattern, str(err)) and any(f.endswith(origin) for f in files)
                and any(library in f for f in files)):
            return f"{tag} ({type(err).__name__})"
    return None


def outcome(stats: Counter, fn):
    """Run fn: a result, our UserError (exit 2, non-empty message), or a tallied known bug; else re-raise."""
    stats["inputs"] += 1
    try:
        result = fn()
    except UserError as err:
        assert err.exit_code == 2 and err.render().strip()
        stats["user_error"] += 1
        return None
    except Exception as err:
        tag = known_bug(err)
        if tag is None:
            raise
        stats[f"KNOWN BUG {tag}"] += 1
        return None
    stats["valid"] += 1
    return result
