"""The operator console: server-rendered pages under ``/ui`` for campaigns and the fleet, live by
server-sent events, signed in with a tenant API key (``docs/console.md``).

Everything ships in the package (templates, CSS, one small script); pages read without
JavaScript, which only adds the live updates and a confirm() before actions.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

from fwcm.api.deps import Hooks, Notify
from fwcm.config import Settings
from fwcm.console.session import Sessions, load_secret
from fwcm.console.views import create_router, environment
from fwcm.store.db import Database


def mount(app: FastAPI, db: Database, settings: Settings, hooks: Hooks | None = None) -> None:
    """Serve the console under ``/ui`` of ``app`` and redirect ``/`` there."""
    settings.ensure_dirs()
    env = environment()
    app.state.console_env = env
    sessions = Sessions(db, load_secret(settings.data_dir))
    app.include_router(create_router(db, sessions, env, Notify(hooks)))
    app.mount("/ui/static", StaticFiles(packages=[("fwcm.console", "static")]), name="console-static")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)
