"""Who may use the UI, and which paths it may touch.

- Bound to a loopback address, the UI trusts the local user, but the Host header must name that address:
  a web page elsewhere cannot reach it through a DNS name rebound to 127.0.0.1.
- Bound to any other address, every request needs the access token (`?token=` once, then a cookie, or an
  `Authorization: Bearer` header).
- Every state-changing request (POST) must come from the UI's own pages: same Origin, no cross-site
  `Sec-Fetch-Site`, and the page's CSRF token in the `X-Tunesmith-CSRF` header, which a cross-site form
  cannot set.
- Run names are single path components that resolve inside the runs folder (no `..`, no absolute path,
  no symlink out).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse

from tunesmith.security import LOOPBACK

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
COOKIE = "tunesmith_token"


@dataclass
class Access:
    host: str
    port: int
    token: str | None  # None: loopback without a token
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def origins(self) -> set[str]:
        hosts = LOOPBACK if self.host in LOOPBACK else {self.host}
        return {f"http://{h}:{self.port}" for h in hosts} | {f"http://[{h}]:{self.port}" for h in hosts if ":" in h}


def needs_token(host: str) -> bool:
    return host not in LOOPBACK


class Guard(BaseHTTPMiddleware):
    def __init__(self, app, access: Access):
        super().__init__(app)
        self.access = access

    async def dispatch(self, request: Request, call_next):
        a = self.access
        if a.token is None and request.url.hostname not in LOOPBACK:
            return PlainTextResponse("Refused: this UI answers only at its loopback address.", status_code=421)
        if a.token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) or _bearer(request)
            if not given or not secrets.compare_digest(given, a.token):
                return PlainTextResponse("Refused: this UI needs its access token (?token=...).", status_code=401)
            if request.query_params.get("token"):  # once in the URL, then a cookie; the URL loses it
                response = RedirectResponse(str(request.url.remove_query_params("token")), status_code=303)
                response.set_cookie(COOKIE, a.token, httponly=True, samesite="strict")
                return response
        if request.method not in ("GET", "HEAD", "OPTIONS") and not same_origin(request, a):
            return PlainTextResponse("Refused: a cross-site request.", status_code=403)
        return await call_next(request)


def same_origin(request: Request, access: Access) -> bool:
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin") or _origin_of(request.headers.get("referer"))
    if origin is not None and origin not in access.origins and origin != _own_origin(request):
        return False
    return secrets.compare_digest(request.headers.get("x-tunesmith-csrf", ""), access.csrf)


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def _origin_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else None


def run_path(root: Path, name: str) -> Path | None:
    """The run directory `name` under root, or None when the name is not a plain name or leads outside."""
    if not NAME.fullmatch(name):
        return None
    path = root / name
    try:
        real = path.resolve(strict=True)
    except OSError:
        return None
    return path if real.parent == root.resolve() and real.is_dir() else None
