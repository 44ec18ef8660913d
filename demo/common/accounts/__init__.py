"""Scenario 1: accounts, SMS codes, sessions (rules, queries, passwords, phones, tokens)."""
