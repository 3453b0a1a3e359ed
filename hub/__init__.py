"""Hexa Hub's domain runtime: settings, the topic contract, the bus, the relay service."""

__version__ = "0.1.0"
