"""Console sessions: sign-in with a tenant API key, a signed cookie, CSRF tokens.

The cookie carries the key's id (never the key) and the session's CSRF token, signed with a
secret kept in the data directory (created on first use, mode 0600) and valid for
``SESSION_S``.  Every request checks the key again, so revoking or expiring a key ends its
console sessions at once.  Every POST carries the session's CSRF token (the sign-in form a
token of its own, bound to a short-lived cookie), compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from fwcm import roles
from fwcm.api.deps import CALLER, TenantCtx
from fwcm.store import console as cq
from fwcm.store.db import Database, aware, utcnow

log = logging.getLogger(__name__)

COOKIE = "fwcm_console"
SIGNIN_COOKIE = "fwcm_signin"
SESSION_S = 12 * 3600
SIGNIN_S = 3600
SECRET_FILE = "console-secret"


def load_secret(data_dir: Path) -> bytes:
    """The server's console secret, created on first use; the same for every restart."""
    path = data_dir / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    secret = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process of this data directory made it just now
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


@dataclass(frozen=True)
class Viewer:
    """The signed-in caller: the tenant, the key's name and role, and the session's CSRF token."""

    tenant: TenantCtx
    csrf: str

    @property
    def can_act(self) -> bool:
        return self.tenant.role >= roles.Role.OPERATOR


class Sessions:
    def __init__(self, db: Database, secret: bytes) -> None:
        self.db = db
        self.signer = URLSafeTimedSerializer(secret, salt="fwcm-console-session")
        self.signin_signer = URLSafeTimedSerializer(secret, salt="fwcm-console-signin")

    def current(self, request: Request) -> Viewer | None:
        """The session's viewer, or None when there is none or its key is no longer usable."""
        raw = request.cookies.get(COOKIE)
        if not raw or len(raw) > 512:
            return None
        try:
            data = self.signer.loads(raw, max_age=SESSION_S)
            key_id, csrf = int(data["k"]), str(data["c"])
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
        ctx = self.identify(request, key_id)
        return None if ctx is None else Viewer(ctx, csrf)

    def identify(self, request: Request, key_id: int) -> TenantCtx | None:
        """The tenant and role of a usable key, left in the request for the audit trail (which
        then records the console's actions as the key's); None for a revoked or expired key."""
        with self.db.read() as s:
            found = cq.key_by_id(s, key_id)
            if found is None:
                return None
            key, tenant = found
            if key.revoked_at is not None or (
                key.expires_at is not None and aware(key.expires_at) <= utcnow()
            ):
                return None
            role = roles.Role.parse(key.role)
            ctx = TenantCtx(tenant.id, tenant.slug, tenant.name, tenant.kind, key.name, role)
        request.scope[CALLER] = ctx
        return ctx

    def start(self, response: Response, request: Request, key_id: int) -> None:
        token = self.signer.dumps({"k": key_id, "c": secrets.token_urlsafe(24)})
        _set(response, request, COOKIE, token, SESSION_S)
        response.delete_cookie(SIGNIN_COOKIE, path="/ui")

    @staticmethod
    def end(response: Response) -> None:
        response.delete_cookie(COOKIE, path="/ui")

    def signin_token(self) -> tuple[str, str]:
        """A token for the sign-in form and its signed copy for a cookie (``bind_signin``): another
        site's form, without the cookie, cannot sign a browser in."""
        nonce = secrets.token_urlsafe(16)
        return nonce, self.signin_signer.dumps(nonce)

    @staticmethod
    def bind_signin(response: Response, request: Request, signed: str) -> None:
        _set(response, request, SIGNIN_COOKIE, signed, SIGNIN_S)

    def signin_ok(self, request: Request, token: str) -> bool:
        raw = request.cookies.get(SIGNIN_COOKIE, "")
        try:
            nonce = str(self.signin_signer.loads(raw, max_age=SIGNIN_S))
        except BadSignature:
            return False
        return hmac.compare_digest(nonce.encode(), token.encode())


def csrf_ok(viewer: Viewer, token: str) -> bool:
    return hmac.compare_digest(viewer.csrf.encode(), token.encode())


def _set(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
