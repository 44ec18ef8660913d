"""Scenario 3: H5 tickets, WebView sessions and the home page."""
