"""When the database is gone the API answers JSON 503 with Retry-After, and recovers by itself once
it is back; any other unexpected error answers JSON 500 and is logged once with its traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from fwcm.api import create_app
from fwcm.config import Settings
from fwcm.store import tenants
from fwcm.store.db import Database

if TYPE_CHECKING:
    from conftest import PrivatePostgres  # the fixture's type, from tests/conftest.py


def _client(db: Database, data_dir: Path) -> TestClient:
    app = create_app(db, Settings(data_dir=data_dir, database_url=db.url))
    with db.session() as s:
        _t, key = tenants.create_tenant(s, "acme", "Acme")
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


def _device(name: str) -> dict[str, str]:
    return {
        "name": name,
        "vendor_id": "6f1c4a8e-0000-4000-8000-000000000001",
        "class_id": "0a3e4a8e-0000-4000-8000-000000000002",
    }


def _assert_unavailable(r: Any) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "the database is unavailable; retry later"}
    assert r.headers["retry-after"] == "5"


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fwcm.api.app" and "database unavailable" in r.message]


def test_sqlite_file_gone_answers_503_then_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "fwcm.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    with _client(db, tmp_path / "data") as client:
        assert client.post("/api/v1/devices", json=_device("before")).status_code == 201
        # The database file becomes unreachable: moved away, its path now a directory.
        db.dispose()
        aside = tmp_path / "aside"
        aside.mkdir()
        for f in tmp_path.glob("fwcm.db*"):
            f.rename(aside / f.name)
        path.mkdir()
        with caplog.at_level(logging.WARNING, logger="fwcm.api.app"):
            _assert_unavailable(client.get("/api/v1/devices"))
            _assert_unavailable(client.post("/api/v1/devices", json=_device("during")))
            _assert_unavailable(client.get("/api/v1/tenant"))
        assert len(_outage_warnings(caplog)) == 1  # once, not once per request
        path.rmdir()
        for f in aside.iterdir():
            f.rename(tmp_path / f.name)
        names = [d["name"] for d in client.get("/api/v1/devices").json()["items"]]
        assert names == ["before"]
    db.dispose()


def test_postgres_stopped_answers_503_then_recovers(
    private_postgres: PrivatePostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(private_postgres.url)
    db.migrate()
    try:
        with _client(db, tmp_path / "data") as client:
            assert client.post("/api/v1/devices", json=_device("before")).status_code == 201
            private_postgres.stop()
            with caplog.at_level(logging.WARNING, logger="fwcm.api.app"):
                _assert_unavailable(client.get("/api/v1/devices"))
                _assert_unavailable(client.post("/api/v1/devices", json=_device("during")))
                _assert_unavailable(client.get("/api/v1/campaigns"))
            assert len(_outage_warnings(caplog)) == 1
            private_postgres.start()
            names = [d["name"] for d in client.get("/api/v1/devices").json()["items"]]
            assert names == ["before"]
            assert client.post("/api/v1/devices", json=_device("after")).status_code == 201
    finally:
        db.dispose()


def test_an_unexpected_error_is_json_500_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'fwcm.db'}")
    db.migrate()
    client = _client(db, tmp_path / "data")

    def broken() -> None:
        raise RuntimeError("a bug")

    client.app.add_api_route("/api/v1/broken", broken)  # type: ignore[attr-defined]
    with client, caplog.at_level(logging.ERROR):
        r = client.get("/api/v1/broken")  # the test client would raise what the app re-raised
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json() == {"detail": "internal error; the server logged it"}
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage() == "GET /api/v1/broken failed"
    assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "a bug"
    db.dispose()
