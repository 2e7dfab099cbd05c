"""`tunesmith ui`: a local web app over the runs folder (`pip install tunesmith[ui]`).

guard.py   who may connect (loopback, token, CSRF) and which run paths are allowed
runs.py    what a page shows of a run directory, tolerant of runs being written
launch.py  the `tunesmith train` processes the UI starts, stops and resumes
app.py     the routes and pages; templates/ and static/ (uPlot, vendored) beside it
"""

from __future__ import annotations

import secrets
from pathlib import Path

from tunesmith.errors import UserError
from tunesmith.security import claim_port


def serve(runs: Path, host: str, port: int, token: str | None) -> None:
    """Check what can be checked before the server starts, print the URL, and serve until Ctrl-C."""
    try:
        import uvicorn

        from tunesmith.ui.app import create_app
        from tunesmith.ui.guard import Access, needs_token
    except ImportError as err:
        raise UserError(f"the UI needs {err.name}", hint="pip install 'tunesmith[ui]'") from None
    if not runs.is_dir():
        raise UserError(f"--runs {runs}: no such folder", hint="Train a run first, or point --runs at a runs folder.")
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: not a port number")
    if needs_token(host) and token is None:
        token = secrets.token_urlsafe(18)
    shown = claim_port(host, port)
    access = Access(host, port, token)
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"tunesmith ui: {runs.resolve()} at {url}  (Ctrl-C stops the UI; runs it started go on)", flush=True)
    uvicorn.run(create_app(runs, access), host=host, port=port, log_level="warning")
