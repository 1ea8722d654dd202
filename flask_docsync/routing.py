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

Across hosts (with ``DOCSYNC_REDIS_URL``): a tag is the host's id and the
worker's. A session of another host is relayed there
(:mod:`flask_docsync.relay`) while the registry
(:mod:`flask_docsync.registry`) lists its worker as alive; the host
receiving the relay hands it to the owner as for any arrival. The heir of a
gone worker is then claimed in Redis, so one worker of the whole deployment
makes its sessions anew. While Redis cannot be reached, each host goes on
routing its own sessions, and a session of another host gets one fresh copy
on this host (with a warning).

Routing is on in a gunicorn worker that has siblings, and in every worker
when the registry is, with signed session ids (the tag is only trusted
under the signature). This module imports no Flask and no WebSocket code.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from . import handover
from .registry import Entry, Registry, RegistryUnavailable
from .relay import HostGone
from .tokens import owner_tag

log = logging.getLogger(__name__)

#: Heir addresses per dead worker: its sessions are re-created on up to this
#: many survivors instead of all on the first one that noticed.
HEIR_BUCKETS = 8
#: Attempts to find or become the heir when other workers race for it.
HEIR_ATTEMPTS = 3
#: Hex digits of a tag that name the host, and those that name the worker on it.
HOST_DIGITS = 6
WORKER_DIGITS = 6


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def host_of(tag: str) -> str | None:
    """The host part of a worker's tag; ``None`` for a tag without one (made before hosts had ids)."""
    return tag[:HOST_DIGITS] if len(tag) == HOST_DIGITS + WORKER_DIGITS else None


class Outcome(enum.Enum):
    #: Serve here: the session is (or will be) this worker's.
    LOCAL = "local"
    #: Serve here as the heir of a worker that is gone.
    ADOPT = "adopt"
    #: Another worker took the connection.
    HANDED = "handed"
    #: The connection goes to another host (the caller runs the relay).
    RELAYED = "relayed"


class Router:
    """This worker's place among the workers of one deployment on one host.

    :param secret: The deployment's secret; it authenticates hand-overs and
        names the deployment's addresses.
    :param serve: ``serve(head, client_socket, buffered)`` serves a
        connection another worker handed over.
    :param registry: The deployment's live workers across hosts; ``None``
        (or one not enabled) routes within this host only.
    """

    def __init__(
        self,
        secret: bytes | None,
        serve: Callable[[dict[str, Any], Any, bytes], None],
        registry: Registry | None = None,
    ) -> None:
        self._secret = secret or b""
        self._serve = serve
        self.registry = registry or Registry(None)
        self._pid: int | None = None
        self._tag = ""
        self._host = ""
        self._listeners: dict[bytes, handover.Listener] = {}
        self._warned: set[str] = set()
        self._warned_unsigned = False
        #: Heir listeners: address -> (the gone worker's tag, when it began).
        self._heirships: dict[bytes, tuple[str, float]] = {}
        #: Advertise URLs of the hosts seen, by host id: a host whose entries
        #: a restarted Redis lost for a moment is still found.
        self._host_urls: dict[str, str] = {}
        #: Whether connections are routed between workers; see :meth:`start`.
        self.active = False
        #: ``attached``: WebSockets that found their session alive here (a
        #: page's first one, or a reconnect); ``handed_over``: sent to the
        #: worker holding their session; ``handover_failed``: a live owner
        #: did not take them (refused 503); ``adopted``: headed for a session
        #: made anew here because its worker is gone; ``relayed``: sent to
        #: another host; ``relay_received``: relayed here by another host;
        #: ``relay_failed``: the other host could not be reached (the session
        #: was made anew); ``cross_host_fresh``: a session of another host
        #: made anew here because Redis could not be asked where it lives.
        self.figures = {"attached": 0, "handed_over": 0, "handover_failed": 0, "adopted": 0, "relayed": 0,
                        "relay_received": 0, "relay_failed": 0, "cross_host_fresh": 0}

    @property
    def tag(self) -> str:
        """This process's tag: its host's id and its own (made anew in a
        forked child, so workers never share one)."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            # Workers that share a namespace reach each other's hand-over
            # sockets: for routing they are one host.
            # The machine's boot id and name, and the advertise URL, tell
            # apart containers that share a name and a master pid of 1.
            name = "/".join((socket.gethostname(), _boot_id(), self._namespace(), self.registry.advertise_url or ""))
            self._host = hashlib.sha256(name.encode("utf-8")).hexdigest()[:HOST_DIGITS]
            self._tag = self._host + secrets.token_hex(WORKER_DIGITS // 2)
            self._listeners = {}  # a parent's listeners are not this process's
            self._heirships = {}
        return self._tag

    @property
    def host(self) -> str:
        """The id of this worker's host (the first digits of its tag)."""
        self.tag  # noqa: B018 - made with the tag
        return self._host

    def _same_host(self, tag: str) -> bool:
        return host_of(tag) in (None, self.host)

    def _namespace(self) -> str:
        # The worker's parent (gunicorn's master) and the secret name the
        # deployment: two deployments on one host never see each other.
        digest = hashlib.sha256(self._secret).hexdigest()[:12]
        return f"{os.getppid()}-{digest}"

    def _address(self, name: str) -> bytes:
        return handover.socket_name(self._namespace(), name)

    def start(self, active: bool, holds: Callable[[str], bool] = lambda tag: False) -> None:
        """Listen for hand-overs when ``active`` or the registry is on (and the system supports them).

        :param holds: ``holds(gone_tag)``: whether this worker holds sessions
            of that gone worker (see :meth:`Registry.start`).
        """
        if self.registry.enabled and not self._secret and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning(
                "WebSockets are not routed between workers and hosts: session ids are not signed, so the"
                " owner written into them cannot be trusted. Set DOCSYNC_SECRET_KEY, the same on every host."
            )
        active = active or self.registry.enabled
        if not active or not self._secret or not handover.SUPPORTED:
            self.active = False
            return
        self.active = True
        address = self._address(self.tag)
        if address not in self._listeners:
            self._listeners[address] = handover.Listener(address, self._secret, self._serve)
        self.registry.start(self.tag, self.host, holds)

    def stop(self) -> None:
        """Stop listening, so that reconnects find this worker gone and go to live ones.

        The registry entry is left to :meth:`Registry.stop`, once the
        worker's connections are closed: the workers of its host tell it is
        gone at once without it.
        """
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._heirships.clear()
        self.active = False

    def owner_elsewhere(self, session_id: str) -> bool:
        """Whether the (signature-checked) id names a worker other than this one."""
        tag = owner_tag(session_id)
        return tag is not None and tag != self.tag

    def may_live_elsewhere(self, session_id: str) -> bool:
        """Whether the session's owner is on another host the registry could find alive."""
        tag = owner_tag(session_id)
        return tag is not None and self.registry.enabled and not self._same_host(tag)

    def deliver(
        self,
        session_id: str,
        send: Callable[[bytes], None],
        relay: Callable[[str, str], None] | None = None,
        hops: int = 0,
        held_here: bool = False,
    ) -> Outcome:
        """Get the connection for ``session_id`` to the worker that is its home.

        :param send: ``send(address)`` hands the connection over to the
            worker at ``address``; it raises
            :exc:`~flask_docsync.handover.OwnerGone` when nobody listens there.
        :param relay: ``relay(url, host)`` opens a relay of the connection to
            the host ``host`` at ``url`` (the caller runs it when this returns
            :attr:`Outcome.RELAYED`); it raises
            :exc:`~flask_docsync.relay.HostGone` when the host cannot be
            reached. ``None``: the connection cannot be relayed.
        :param hops: Relays the request has been through; a relayed one is
            not relayed again.
        :param held_here: This worker holds a copy of the session (made as
            the heir of its gone worker, or while Redis could not be asked).
        :raises flask_docsync.handover.HandOverFailed: a live worker did not
            take the connection.
        """
        tag = owner_tag(session_id)
        if not self.active or tag is None or tag == self.tag:
            return Outcome.LOCAL
        relay = relay if not hops else None
        bucket = int(hashlib.sha256(session_id.encode("utf-8")).hexdigest(), 16) % HEIR_BUCKETS
        if self._same_host(tag):
            if self._send(send, tag):
                return Outcome.HANDED
            if self.registry.enabled:
                self.registry.forget(tag)  # its entry may live on for a few seconds
            # The heir socket decides on the host, with Redis or without, so
            # that Redis coming and going cannot give one session two heirs.
            return self._heir_on_host(tag, bucket, send)
        if self.registry.enabled:
            try:
                entry = self.registry.lookup(tag, host_of(tag), bucket)
            except RegistryUnavailable:
                return self._fresh_for_other_host(session_id, tag, bucket, send, held_here)
            if entry.host_url is not None:
                self._host_urls[tag[:HOST_DIGITS]] = entry.host_url
            outcome = self._to_live_home(tag, entry, send, relay, held_here)
            if outcome is not None:
                return outcome
            try:
                return self._heir_in_registry(tag, bucket, send, relay)
            except RegistryUnavailable:
                pass
        return self._fresh_for_other_host(session_id, tag, bucket, send, held_here)

    def _to_live_home(
        self, tag: str, entry: Entry, send: Callable[[bytes], None], relay: Callable[[str, str], None] | None,
        held_here: bool,
    ) -> Outcome | None:
        """Route a session of another host's worker to where it lives, if anywhere; ``None``: nowhere."""
        if entry.alive:
            # The owner wins over any copy (one made while Redis was away).
            if relay is None:
                # Relayed here already (a race with the registry): a copy
                # here would be a second one; the client's retry goes anew.
                raise handover.HandOverFailed(f"the session's worker {tag} is alive on another host")
            if self._relay(relay, tag, entry.url):
                return Outcome.RELAYED
            return None
        if entry.heir == self.tag:
            self.figures["adopted"] += 1
            return Outcome.ADOPT
        if entry.heir is not None:
            if self._same_host(entry.heir):
                if self._send(send, entry.heir):
                    return Outcome.HANDED
            elif relay is not None and self._relay(relay, entry.heir, entry.heir_url):
                return Outcome.RELAYED
            return None
        if held_here:
            return None
        # No heir yet, the worker's entry missing: its host, while it lives
        # (or was known here), tells whether the worker does. Its entry may
        # be missing a moment after a Redis restart, or not written yet.
        url = entry.host_url or self._host_urls.get(tag[:HOST_DIGITS])
        if relay is not None and url is not None and self._relay(relay, tag, url, quiet=not entry.host_alive):
            return Outcome.RELAYED
        return None

    def _send(self, send: Callable[[bytes], None], tag: str) -> bool:
        try:
            send(self._address(tag))
        except handover.OwnerGone:
            return False
        self.figures["handed_over"] += 1
        return True

    def _relay(self, relay: Callable[[str, str], None], tag: str, url: str | None, quiet: bool = False) -> bool:
        if url is None:
            if tag[:HOST_DIGITS] not in self._warned:
                self._warned.add(tag[:HOST_DIGITS])
                log.warning(
                    "Worker %s lives on a host that set no DOCSYNC_ADVERTISE_URL, so WebSockets for its sessions"
                    " that reach this host cannot be relayed there and get fresh sessions here; set"
                    " DOCSYNC_ADVERTISE_URL on every host", tag,
                )
            return False
        try:
            relay(url, tag[:HOST_DIGITS])
        except HostGone as exc:
            if quiet:  # a host only remembered here: gone, as the registry says
                self._host_urls.pop(tag[:HOST_DIGITS], None)
                return False
            self.figures["relay_failed"] += 1
            log.warning("The host of worker %s cannot be reached (%s); its session is made anew", tag, exc)
            return False
        self.figures["relayed"] += 1
        return True

    def _heir_in_registry(
        self, tag: str, bucket: int, send: Callable[[bytes], None], relay: Callable[[str, str], None] | None
    ) -> Outcome:
        gone: str | None = None
        for _ in range(HEIR_ATTEMPTS):
            heir = self.registry.claim_heir(tag, bucket, instead_of=gone)
            if heir == self.tag:
                break
            if self._same_host(heir):
                if self._send(send, heir):
                    return Outcome.HANDED
            elif relay is not None:
                entry = self.registry.lookup(heir)
                if entry.alive and self._relay(relay, heir, entry.url):
                    return Outcome.RELAYED
            else:
                # Relayed here already: one more hop is refused, so this
                # copy is made here rather than not at all.
                log.warning("A session of gone worker %s was relayed here, but its heir is %s on another host;"
                            " making a second copy here", tag, heir)
                break
            gone = heir
        else:
            log.warning("No live heir for the sessions of gone worker %s after %d attempts; serving here",
                        tag, HEIR_ATTEMPTS)
        self.figures["adopted"] += 1
        return Outcome.ADOPT

    def _fresh_for_other_host(
        self, session_id: str, tag: str, bucket: int, send: Callable[[bytes], None], held_here: bool
    ) -> Outcome:
        # One copy per host: its heir makes it, as for a gone worker of this host.
        outcome = self._heir_on_host(tag, bucket, send)
        if outcome is Outcome.ADOPT and not held_here:
            self.figures["cross_host_fresh"] += 1
            log.warning(
                "Session %s belongs to worker %s of another host, which cannot be looked up while Redis is"
                " unreachable: it is made anew here", session_id.partition(".")[0], tag,
            )
        return outcome

    def _heir_on_host(self, tag: str, bucket: int, send: Callable[[bytes], None]) -> Outcome:
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
                self._heirships[heir] = (tag, time.monotonic())
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue  # another worker became the heir just now: hand it over there
            log.info("Worker %s is the heir of the sessions of gone worker %s (bucket %d)", self.tag, tag, bucket)
            break
        self.figures["adopted"] += 1
        return Outcome.ADOPT

    def release_heirships(self, holds: Callable[[str], bool], grace: float = 60.0) -> int:
        """Stop being the heir of gone workers none of whose sessions live here any more.

        Worker restarts (``max_requests``, deploys) would otherwise leave up
        to :data:`HEIR_BUCKETS` listeners per gone worker on the survivors
        for good. ``grace`` seconds after an heirship began it is kept
        anyway: the session it was taken for is made after it.

        :return: How many were released.
        """
        now = time.monotonic()
        released = 0
        for address, (tag, since) in list(self._heirships.items()):
            if now - since < grace or holds(tag):
                continue
            listener = self._listeners.pop(address, None)
            if listener is not None:
                listener.close()
            del self._heirships[address]
            released += 1
        return released

    def stats(self) -> dict[str, Any]:
        listeners = list(self._listeners.values())
        return {
            "active": self.active,
            "tag": self.tag,
            "host": self.host,
            "registry": self.registry.stats(),
            **self.figures,
            "received": sum(listener.received for listener in listeners),
            "refused": sum(listener.refused for listener in listeners),
            "heir_of": len(listeners) - (1 if self.active else 0),
        }
