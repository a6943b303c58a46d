"""The WebSocket server: sessions, their outboxes and the listener, on trio and trio-websocket."""
