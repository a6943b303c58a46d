"""mqbroker: an MQTT-style topic pub/sub broker sidecar over WebSocket, on trio."""

__version__ = "0.1.0"
