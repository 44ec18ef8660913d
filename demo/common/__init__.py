"""Shared code: rules and services in plain modules, plus the Tornado base handlers (handlers.py)."""
