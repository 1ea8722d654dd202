"""Lifecycle hooks of the hooksapp test app.

Each hook appends a line to the file named by $HOOKSAPP_RECORD, so tests
(and main.py) can see which hooks ran, in what order, for which session.
on_session_created is ``async def`` and really awaits: Bokeh 3.9 never runs
such a hook; flask-docsync must.
"""

import asyncio
import os


def _record(line):
    path = os.environ.get("HOOKSAPP_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def on_server_loaded(server_context):
    _record("server_loaded")


def on_server_unloaded(server_context):
    _record("server_unloaded")


async def on_session_created(session_context):
    await asyncio.sleep(0)
    _record(f"session_created {session_context.id}")


def on_session_destroyed(session_context):
    _record(f"session_destroyed {session_context.id}")
