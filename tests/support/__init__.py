"""Helpers the test modules share: hubs, databases, accounts, devices, MQTT and WebSocket
clients, and checks on answers. Fixtures and hooks stay in ``tests/conftest.py``."""
