"""Shared code: rules and services in plain modules, plus the Tornado web base (web/)."""
