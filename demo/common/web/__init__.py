"""The Tornado web base: handlers, the error map, routing, the HTTP server."""
