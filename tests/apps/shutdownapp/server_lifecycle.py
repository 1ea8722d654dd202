"""Records every lifecycle hook in the file named by $DOCSYNC_TEST_RECORD."""

import os


def _record(line):
    path = os.environ.get("DOCSYNC_TEST_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def on_server_loaded(server_context):
    _record("server_loaded")


def on_server_unloaded(server_context):
    _record("server_unloaded")


def on_session_created(session_context):
    _record("session_created " + session_context.id)


def on_session_destroyed(session_context):
    _record("session_destroyed " + session_context.id)
