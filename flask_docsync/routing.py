"""Which worker process serves a session: one home per session on a host.

A session id made by a worker carries the worker's tag
(:func:`flask_docsync.tokens.owner_tag`). The worker that receives a
WebSocket for a session asks its :class:`Router` what to do:

- the tag is its own, or the id has none, or routing is off: serve here;
- another live worker owns it: hand the connection over
  (:mod:`flask_docsync.handover`), after which the owner serves it directly;
- the owner is gone (killed, restarted, or a previous process): the session
  is made anew by its *heir*, the one live worker that listens on the heir
  address of the dead tag and the session's bucket. The first worker to
  find no heir becomes it (binding an address is atomic), so a session is
  re-created once, and its later reconnects reach that copy through the
  heir address; the buckets spread a dead worker's sessions over the
  survivors.

Routing is on in a gunicorn worker that has siblings, with signed session
ids (the tag is only trusted under the signature). This module imports no
Flask and no WebSocket code.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from . import handover
from .tokens import owner_tag

log = logging.getLogger(__name__)

#: Heir addresses per dead worker: its sessions are re-created on up to this
#: many survivors instead of all on the first one that noticed.
HEIR_BUCKETS = 8
#: Attempts to find or become the heir when other workers race for it.
HEIR_ATTEMPTS = 3


class Outcome(enum.Enum):
    #: Serve here: the session is (or will be) this worker's.
    LOCAL = "local"
    #: Serve here as the heir of a worker that is gone.
    ADOPT = "adopt"
    #: Another worker took the connection.
    HANDED = "handed"


class Router:
    """This worker's place among the workers of one deployment on one host.

    :param secret: The deployment's secret; it authenticates hand-overs and
        names the deployment's addresses.
    :param serve: ``serve(head, client_socket, buffered)`` serves a
        connection another worker handed over.
    """

    def __init__(self, secret: bytes | None, serve: Callable[[dict[str, Any], Any, bytes], None]) -> None:
        self._secret = secret or b""
        self._serve = serve
        self._pid: int | None = None
        self._tag = ""
        self._listeners: dict[bytes, handover.Listener] = {}
        #: Whether connections are routed between workers; see :meth:`start`.
        self.active = False
        #: ``attached``: WebSockets that found their session alive here (a
        #: page's first one, or a reconnect); ``handed_over``: sent to the
        #: worker holding their session; ``handover_failed``: a live owner
        #: did not take them (refused 503); ``adopted``: headed for a session
        #: made anew here because its worker is gone.
        self.figures = {"attached": 0, "handed_over": 0, "handover_failed": 0, "adopted": 0}

    @property
    def tag(self) -> str:
        """This process's tag (made anew in a forked child, so workers never share one)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._tag = secrets.token_hex(4)
            self._listeners = {}  # a parent's listeners are not this process's
        return self._tag

    def _namespace(self) -> str:
        # The worker's parent (gunicorn's master) and the secret name the
        # deployment: two deployments on one host never see each other.
        digest = hashlib.sha256(self._secret).hexdigest()[:12]
        return f"{os.getppid()}-{digest}"

    def _address(self, name: str) -> bytes:
        return handover.socket_name(self._namespace(), name)

    def start(self, active: bool) -> None:
        """Listen for hand-overs when ``active`` (and the system supports them)."""
        if not active or not self._secret or not handover.SUPPORTED:
            self.active = False
            return
        self.active = True
        address = self._address(self.tag)
        if address not in self._listeners:
            self._listeners[address] = handover.Listener(address, self._secret, self._serve)

    def stop(self) -> None:
        """Stop listening, so that reconnects find this worker gone and go to live ones."""
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self.active = False

    def owner_elsewhere(self, session_id: str) -> bool:
        """Whether the (signature-checked) id names a worker other than this one."""
        tag = owner_tag(session_id)
        return tag is not None and tag != self.tag

    def deliver(self, session_id: str, send: Callable[[bytes], None]) -> Outcome:
        """Get the connection for ``session_id`` to the worker that is its home.

        :param send: ``send(address)`` hands the connection over to the
            worker at ``address``; it raises
            :exc:`~flask_docsync.handover.OwnerGone` when nobody listens there.
        :raises flask_docsync.handover.HandOverFailed: a live worker did not
            take the connection.
        """
        tag = owner_tag(session_id)
        if not self.active or tag is None or tag == self.tag:
            return Outcome.LOCAL
        try:
            send(self._address(tag))
        except handover.OwnerGone:
            pass
        else:
            self.figures["handed_over"] += 1
            return Outcome.HANDED
        bucket = int(hashlib.sha256(session_id.encode("utf-8")).hexdigest(), 16) % HEIR_BUCKETS
        heir = self._address(f"heir-{tag}-{bucket}")
        for _ in range(HEIR_ATTEMPTS):
            if heir in self._listeners:
                break
            try:
                send(heir)
            except handover.OwnerGone:
                pass
            else:
                self.figures["handed_over"] += 1
                return Outcome.HANDED
            try:
                self._listeners[heir] = handover.Listener(heir, self._secret, self._serve)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue  # another worker became the heir just now: hand it over there
            log.info("Worker %s is the heir of the sessions of gone worker %s (bucket %d)", self.tag, tag, bucket)
            break
        self.figures["adopted"] += 1
        return Outcome.ADOPT

    def stats(self) -> dict[str, Any]:
        listeners = list(self._listeners.values())
        return {
            "active": self.active,
            "tag": self.tag,
            **self.figures,
            "received": sum(listener.received for listener in listeners),
            "refused": sum(listener.refused for listener in listeners),
            "heir_of": len(listeners) - (1 if self.active else 0),
        }
