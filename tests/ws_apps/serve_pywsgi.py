"""Serve echo_app with gevent.pywsgi on 127.0.0.1 and print the port.

Usage: python serve_pywsgi.py [--patch] [--gws]

--patch  call gevent.monkey.patch_all() first
--gws    use gevent-websocket's WebSocketHandler
"""

import sys

if "--patch" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import os

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gevent.pywsgi import WSGIServer  # noqa: E402

from echo_app import app  # noqa: E402


def main():
    kwargs = {}
    if "--gws" in sys.argv:
        from geventwebsocket.handler import WebSocketHandler

        kwargs["handler_class"] = WebSocketHandler

    server = WSGIServer(("127.0.0.1", 0), app, **kwargs)
    server.start()
    print(f"PORT {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
