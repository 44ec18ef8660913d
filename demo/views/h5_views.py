"""H5 handlers: tickets for the app, the ticket exchange, the home page, its upload and logout."""

from __future__ import annotations

from demo.common.h5.rules import SwitchOffer
from demo.common.images import imaging
from demo.common.web.api import ApiHandler
from demo.common.web.auth import authenticates_itself, requires_h5_session, requires_session
from demo.common.web.base import H5_COOKIE
from demo.common.web.pages import H5PageHandler, check_h5_form
from demo.common.web.uploads import UploadHandler


class TicketHandler(ApiHandler):
    @requires_session
    async def post(self) -> None:
        """A fresh one-time H5 URL for the calling app session; its pages are in the app's language."""
        ticket = await self.h5.issue_ticket(self.principal, self.language)
        self.write_json({"h5_url": self.h5_url(ticket), "expires_in": self.h5.rules.ticket_ttl})


class HomeHandler(H5PageHandler):
    @authenticates_itself
    async def get(self) -> None:
        """With ?ticket=: exchange it for the cookie and redirect (or ask first, see ``exchange``);
        right after logout (?signed_out, no cookie): the signed-out page; otherwise the home page, whose
        visit checks the cookie in the same unit of work that reads the page (``H5.visit_home``)."""
        ticket = self.get_query_argument("ticket", None)
        if ticket is not None:
            await self.exchange(ticket)
            return
        cookie = self.get_cookie(H5_COOKIE)
        if cookie is None and self.get_query_argument("signed_out", None) is not None:
            self.render("h5/signed_out.html")
            return
        self.principal, page = await self.h5.visit_home(cookie)
        self.use_language(self.principal.lang)  # the session's (its ticket's: the app's) language
        images = []
        for image in page["images"]:
            path = f"/images/{image['id']}.{imaging.EXTENSIONS[image['format']]}"
            images.append({**image, "url": self.absolute_url(path), "thumb": self.absolute_url(f"{path}?w=320")})
        self.render("h5/home.html", page=page, images=images)

    async def exchange(self, ticket: str) -> None:
        """Spend the ticket: sign in and redirect, or, signed in as someone else, ask first."""
        granted = await self.h5.exchange(ticket, self.get_cookie(H5_COOKIE))
        if isinstance(granted, SwitchOffer):
            self.use_language(granted.lang)  # the link's language, not the WebView's
            self.render("h5/switch.html", offer=granted)
            return
        self.set_session_cookie(granted)
        self.redirect("/h5/home")  # the ticket leaves the address bar (and the history)


class PageUploadHandler(UploadHandler):
    """The home page's upload (an XHR with the X-XSRFToken header): the /images upload (an
    ``UploadStream``) with the H5 cookie instead of a bearer token. The page's script reads JSON: the
    image object on success, the contract's error object otherwise (401 and 403 included), like every upload."""

    def check_xsrf_cookie(self) -> None:
        check_h5_form(self)  # a cookie-authenticated post: the H5 pages' XSRF check

    @requires_h5_session
    async def post(self) -> None:
        """Upload one image from the H5 page; answers the image object as JSON."""
        await self.upload.finish()


class SwitchHandler(H5PageHandler):
    @requires_h5_session
    async def post(self) -> None:
        """Switch to the account of a link opened while signed in as another (the choice page's
        XSRF-protected form): the current H5 session ends, the link's account's begins."""
        cookie = await self.h5.switch(self.get_body_argument("ticket"), self.principal)
        self.set_session_cookie(cookie)
        self.redirect("/h5/home")


class PageLogoutHandler(H5PageHandler):
    @requires_h5_session
    async def post(self) -> None:
        """End the H5 session (XSRF-protected form post) and say so: the cookie is gone, so the home
        page's ?signed_out shows the signed-out page instead of the 401 page."""
        await self.h5.logout(self.principal)
        self.clear_session_cookie()
        self.redirect("/h5/home?signed_out=1")
