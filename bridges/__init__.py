"""Bridges to other ecosystems (Home Assistant, HomeKit, Alexa); each a bus client."""
