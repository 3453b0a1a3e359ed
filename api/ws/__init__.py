"""WebSocket gateways: devices and clients bridged onto the bus."""
