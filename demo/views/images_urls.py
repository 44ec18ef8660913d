"""Images (scenario 2): upload, list, delete, deliver."""
from demo.views import images_views as v

urls = [
    (r"/images", v.ImageCollectionHandler),
    (r"/images/([A-Za-z0-9_-]+)\.([a-z]+)", v.ImageFileHandler),
    (r"/images/([A-Za-z0-9_-]+)", v.ImageItemHandler),
]
