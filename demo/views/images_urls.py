"""Images (scenario 2): upload, list, delete, deliver."""

from tornado.web import url

from demo.views import images_views as v

urls = [
    url(r"/images", v.ImageCollectionHandler, name="images.collection"),
    url(r"/images/([A-Za-z0-9_-]+)\.([a-z]+)", v.ImageFileHandler, name="images.file"),
    url(r"/images/([A-Za-z0-9_-]+)", v.ImageItemHandler, name="images.item"),
]
