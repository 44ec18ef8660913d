"""H5 pages (scenario 3) opened by the app's WebView. Unknown /h5/ paths get the HTML 404 page."""
from demo.common.web.handlers import H5NotFoundHandler
from demo.views import h5_views as v

urls = [
    (r"/h5/ticket", v.TicketHandler),
    (r"/h5/home", v.HomeHandler),
    (r"/h5/images", v.PageUploadHandler),
    (r"/h5/switch", v.SwitchHandler),
    (r"/h5/logout", v.LogoutHandler),
    (r"/h5/.*", H5NotFoundHandler),
]
