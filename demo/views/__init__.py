"""One ``<area>_urls.py`` (URL table) and ``<area>_views.py`` (thin handlers) per area."""
