"""`kiln serve`: HTTP APIs (AUTOMATIC1111's /sdapi/v1 and kiln's /api/v1 jobs) and the web UI."""
from .app import create_app, make_worker
from .context import RequestError, ServerConfig, parse_api_auth
from .worker import Limits

__all__ = ["ServerConfig", "create_app", "make_worker", "parse_api_auth", "Limits", "RequestError"]
