"""The HTTP and WebSocket API: REST routers, gateways, auth and the error contract."""
