"""Shared fixtures: tiny random models (tests/plugins/models.py) and the loopback Hub (tests/plugins/hub.py)."""

pytest_plugins = ["tests.plugins.models", "tests.plugins.hub"]
