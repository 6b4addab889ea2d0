"""REST management API (FastAPI), tenant-scoped, OpenAPI at /api/v1/openapi.json."""

from fwcm.api.app import Hooks, create_app

__all__ = ["Hooks", "create_app"]
