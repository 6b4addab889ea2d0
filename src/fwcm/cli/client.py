"""HTTP client of the management API used by the ``fwcm`` client commands.

Where to connect comes from ``FWCM_URL`` and ``FWCM_API_KEY``, falling back to the config file
written by ``fwcm login`` (``$FWCM_CONFIG`` or ``~/.config/fwcm/config.toml``, mode 0600).
Every failure becomes an ``ApiError`` whose message is one line for the user.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
API_PREFIX = "/api/v1"
UPLOAD_CHUNK = 1 << 20
PAGE = 1000
"""Items the CLI asks for per page when it reads a whole list."""


class ApiError(Exception):
    """A failed request; ``str()`` is the one line shown to the user."""

    def __init__(self, message: str, status: int | None = None, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors or []
        """Every problem the server listed (``errors`` beside ``detail``: a refused import)."""


def config_path() -> Path:
    explicit = os.environ.get("FWCM_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fwcm" / "config.toml"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None


def load_config() -> ClientConfig:
    """Environment first, then the config file, then the default URL (and no key)."""
    file_values: dict[str, Any] = {}
    path = config_path()
    if path.is_file():
        try:
            file_values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ApiError(f"cannot read config file {path}: {exc}") from None
    url = os.environ.get("FWCM_URL") or file_values.get("url") or DEFAULT_URL
    key = os.environ.get("FWCM_API_KEY") or file_values.get("api_key")
    return ClientConfig(url=str(url).rstrip("/"), api_key=str(key) if key else None)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def save_config(url: str, api_key: str, path: Path | None = None) -> Path:
    """Write the config file readable by its owner only (it holds a credential)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"url = {_toml_str(url.rstrip('/'))}\napi_key = {_toml_str(api_key)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    text = response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
    return f"HTTP {response.status_code}: {text}"


def _errors(response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return []
    errors = body.get("errors") if isinstance(body, dict) else None
    return [str(e) for e in errors] if isinstance(errors, list) else []


class ApiClient:
    """Thin wrapper over httpx that turns every failure into an ``ApiError``."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        headers = {"User-Agent": "fwcm-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if http is None:
            http = httpx.Client(base_url=self.url, timeout=timeout)
        http.headers.update(headers)
        self.http = http

    @classmethod
    def from_env(cls) -> ApiClient:
        cfg = load_config()
        if not cfg.api_key:
            raise ApiError("no API key: set FWCM_API_KEY or run `fwcm login --url URL --api-key KEY`")
        return cls(cfg.url, cfg.api_key)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = path if path.startswith("/p/") else API_PREFIX + path
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(f"timed out talking to {self.url}") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise ApiError(_detail(response), response.status_code, _errors(response))
        return response

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def items(self, path: str, **params: Any) -> list[Any]:
        """Every item of a list, page after page (the API's ``{items, total, limit, offset}``)."""
        out: list[Any] = []
        while True:
            page = self.get(path, **params, limit=PAGE, offset=len(out))
            out.extend(page["items"])
            if not page["items"] or len(out) >= page["total"]:
                return out

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Any:
        if json_body is not None:
            kwargs["json"] = json_body
        return self.request("POST", path, **kwargs).json()

    def patch(self, path: str, json_body: Any) -> Any:
        return self.request("PATCH", path, json=json_body).json()

    def delete(self, path: str, **params: Any) -> None:
        self.request("DELETE", path, params={k: v for k, v in params.items() if v is not None})

    def upload(self, path: str, file: Path, content_type: str, **params: Any) -> Any:
        """POST a file as the raw body, streamed in chunks."""
        try:
            size = file.stat().st_size
            f = file.open("rb")
        except OSError as exc:
            raise ApiError(f"cannot read {file}: {exc.strerror or exc}") from None

        def chunks() -> Iterator[bytes]:
            while chunk := f.read(UPLOAD_CHUNK):
                yield chunk

        with f:
            return self.post(
                path,
                content=chunks(),
                params={k: v for k, v in params.items() if v is not None},
                headers={"Content-Type": content_type, "Content-Length": str(size)},
            )
