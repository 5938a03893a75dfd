"""The reward service: a thin FastAPI shell over `rewarders` (see app.create_app)."""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]
