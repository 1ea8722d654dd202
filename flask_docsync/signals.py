"""Signals of DocSync sessions, on blinker (as Flask's own signals are).

Connect with the app's server as sender, so that only that app's sessions
reach the receiver::

    from flask_docsync import signals

    @signals.session_created.connect_via(docsync.server(app))
    def created(server, session, route):
        app.logger.info("session %s of %s", session.id, route)

A receiver runs in the greenlet that created the session (the page,
``autoload.js`` or WebSocket request, or ``create_session``), after the
app's ``on_session_created`` hooks and before the session is used; an
exception it raises fails that request.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Sent with ``session=`` (the :class:`~flask_docsync.session.ServerSession`)
#: and ``route=`` when a server has created a session.
session_created = _signals.signal("docsync-session-created")
