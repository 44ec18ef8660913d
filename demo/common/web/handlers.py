"""Transitional re-exports of the web base, now in base.py, auth.py, errors.py, api.py and pages.py.

Removed once every import names the new modules (issue 14).
"""
from demo.common.web.api import JSON_MEDIA_TYPE, MAX_JSON_BYTES, ApiHandler, NotFoundHandler, StaticHandler, text_field
from demo.common.web.auth import Auth, authenticates_itself, public, requires_h5_session, requires_session
from demo.common.web.base import H5_COOKIE, BaseHandler
from demo.common.web.errors import DISK_FULL, ERROR_STATUS, STATUS_CODE, error_body
from demo.common.web.pages import H5NotFoundHandler, H5PageHandler, check_h5_form, is_cross_site, own_origins

authenticated = requires_session  # the old names, for branches written before the rename
h5_session = requires_h5_session

__all__ = [
    "DISK_FULL", "ERROR_STATUS", "H5_COOKIE", "JSON_MEDIA_TYPE", "MAX_JSON_BYTES", "STATUS_CODE", "ApiHandler", "Auth",
    "BaseHandler", "H5NotFoundHandler", "H5PageHandler", "NotFoundHandler", "StaticHandler", "authenticated",
    "authenticates_itself", "check_h5_form", "error_body", "h5_session", "is_cross_site", "own_origins", "public",
    "requires_h5_session", "requires_session", "text_field",
]
