"""Helper WSGI apps, server launchers and a raw client for test_websocket."""
