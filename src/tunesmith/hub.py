"""A `model.name` that is neither embedded nor a local path: a Hugging Face Hub id.

Left to transformers, an id the hub cannot answer for costs a minute of retry warnings (five retries
per file, with backoff) before a message about connectivity. Here it costs one request: offline, the
local hub cache is the only answer; online, one metadata request says whether the hub knows the id,
and a hub that does not answer falls back to the cache at once.
"""

from __future__ import annotations

import difflib
import os

from tunesmith.errors import UserError

NAMES_HINT = "Use an embedded short name (see `tunesmith models`), a local model directory or .gguf file, or a hub id."


def cached_snapshot(name: str, revision: str | None) -> str | None:
    """The local hub cache's folder of this id and revision, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    return os.path.dirname(found) if isinstance(found, str) else None


def _unknown(name: str, why: str) -> UserError:
    from tunesmith.models import EMBEDDED

    close = difflib.get_close_matches(name, list(EMBEDDED), n=1)
    return UserError(
        f"Model not found: {name} ({why})",
        hint=f"Did you mean the embedded '{close[0]}'? " + NAMES_HINT if close else NAMES_HINT,
    )


def _no_answer(err: Exception) -> bool:
    """Refused, DNS, timeout or a 5xx: the HTTP client's own errors, whichever client this huggingface_hub
    uses (requests, httpx, or a fork of it)."""
    client = type(err).__module__.split(".")[0]
    return isinstance(err, (OSError, TimeoutError)) or client.startswith(("httpx", "httpcore", "requests", "urllib3"))


def hub_model(mcfg) -> str:
    """What transformers should load for hub id `mcfg.name`: the id (the hub answers for it) or the
    cached snapshot folder (offline, or the hub unreachable). Raises at once when neither exists."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    name, revision = mcfg.name, mcfg.revision
    where = f"{name}@{revision}" if revision else name
    snapshot = cached_snapshot(name, revision)
    if constants.HF_HUB_OFFLINE:
        if snapshot is None:
            raise _unknown(
                where, "not a local path or embedded name, and not in the local hub cache; HF_HUB_OFFLINE is set"
            )
        return snapshot
    try:
        model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        raise UserError(f"{name} is gated on the hub: accept its terms there and log in (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{name} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise _unknown(where, "no such model on the hub, or it is private and no token is set") from None
    except Exception as err:
        if not _no_answer(err):
            raise
        if snapshot is not None:
            return snapshot
        raise _unknown(
            where, f"the hub did not answer ({type(err).__name__}) and it is not in the local hub cache"
        ) from None
    return name
