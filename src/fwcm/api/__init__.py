"""REST API (FastAPI): the tenant-scoped management API (OpenAPI at /api/v1/openapi.json) and the
device-facing payload route."""

from fwcm.api.app import create_app
from fwcm.api.deps import Hooks

__all__ = ["Hooks", "create_app"]
