"""H5 pages (scenario 3) opened by the app's WebView. Unknown /h5/ paths get the HTML 404 page."""

from tornado.web import url

from demo.common.web.pages import H5NotFoundHandler
from demo.views import h5_views as v

urls = [
    url(r"/h5/ticket", v.TicketHandler, name="h5.ticket"),
    url(r"/h5/home", v.HomeHandler, name="h5.home"),
    url(r"/h5/images", v.PageUploadHandler, name="h5.images"),
    url(r"/h5/switch", v.SwitchHandler, name="h5.switch"),
    url(r"/h5/logout", v.PageLogoutHandler, name="h5.logout"),
    url(r"/h5/.*", H5NotFoundHandler, name="h5.not_found"),
]
