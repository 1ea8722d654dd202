"""The live workers of a deployment's hosts, kept in Redis.

With ``DOCSYNC_REDIS_URL`` set, every worker writes
``<prefix>:worker:<tag>`` and ``<prefix>:host:<host id>`` (its advertise
URL, see ``DOCSYNC_ADVERTISE_URL``) with a time to live of :data:`TTL`
seconds and refreshes them every :data:`REFRESH` seconds; a graceful stop
deletes the worker's. So a
worker on another host can tell whether the worker named in a session id is
alive and where to relay its WebSocket (:mod:`flask_docsync.relay`); a
worker killed with ``kill -9`` drops out after at most :data:`TTL` seconds,
or at once when a worker of its host finds its hand-over socket gone.

When a session's worker is gone, one live worker of the whole deployment
makes it anew: the first to claim ``<prefix>:heir:<tag>:<bucket>`` (``SET
NX``, or replacing an heir that is gone itself). Its claims are refreshed
while it holds sessions of that worker, so later reconnects of those
sessions, on any host, find it.

Redis being unreachable is not an error here: calls raise
:exc:`RegistryUnavailable` at once for :data:`BACKOFF` seconds after a
failure (a Redis that does not answer would otherwise make every reconnect
wait for its timeout), and routing falls back to what one host can do
alone. This module imports no Flask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.monkey

from .pubsub import is_connection_error, redis_client, safe_url

log = logging.getLogger(__name__)

#: Seconds a worker's entry lives unless refreshed: how long a worker killed
#: without warning may still look alive to other hosts (a relay to it then
#: finds it gone and the session is made anew all the same).
TTL = 10
#: Seconds between refreshes of this worker's entry and its heir claims.
REFRESH = 3.0
#: Seconds an heir claim lives unless refreshed.
HEIR_TTL = 30
#: Seconds a claim is kept after it was made even if no session of the gone
#: worker is held here (yet): the session is made after the claim.
HEIR_GRACE = 60.0
#: Seconds Redis is not asked again after it failed to answer.
BACKOFF = 2.0
#: Seconds one Redis call may take: routing waits for it during a handshake.
TIMEOUT = 1.0

# The current heir stays unless it is gone (its worker entry expired) or is
# the one the caller found gone; then the caller becomes the heir. Atomic, so
# racing workers on every host agree on one heir.
_CLAIM_HEIR = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[4] and redis.call('EXISTS', ARGV[3] .. current) == 1 then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""

# A claim is extended only by its holder: another worker may have taken it
# over while this one could not reach Redis. One that Redis lost (a restart
# without persistence) is made again.
_EXTEND_HEIR = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return redis.call('EXPIRE', KEYS[1], ARGV[2])
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""

# One round trip for what routing needs: the worker's entry, its host's, and
# the heir of the session's bucket with the heir's own entry.
_LOOKUP = """
local heir = redis.call('GET', KEYS[3])
local heir_entry = false
if heir then heir_entry = redis.call('GET', ARGV[1] .. heir) end
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2]), heir, heir_entry}
"""


@dataclasses.dataclass(frozen=True)
class Entry:
    """What :meth:`Registry.lookup` found.

    A URL is ``None`` when its worker or host advertises none (or is not
    there); :attr:`heir` is ``None`` unless a live worker is the heir.
    """

    alive: bool
    url: str | None
    host_alive: bool
    host_url: str | None
    heir: str | None
    heir_url: str | None


class RegistryUnavailable(Exception):
    """Redis cannot be asked now; the message says why."""


class Registry:
    """This worker's entry among a deployment's live workers.

    :param redis_url: ``None`` turns the registry off (:attr:`enabled` is false).
    :param prefix: Of every key, as for broadcasts.
    :param advertise_url: Where other hosts reach this one; ``None`` when
        they cannot (its sessions are then made anew where they arrive).
    :param secret: The deployment's secret. Entries carry an HMAC of it
        over their key and URL, and an entry without a valid one is taken
        for absent: whoever can write to the Redis, but does not know the
        secret, cannot send this deployment's WebSockets elsewhere.
    :param client_factory: As for :class:`flask_docsync.pubsub.Hub`.
    """

    def __init__(
        self,
        redis_url: str | None,
        prefix: str = "docsync",
        advertise_url: str | None = None,
        secret: bytes | None = None,
        client_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.advertise_url = advertise_url
        self._secret = secret or b""
        self._off_reason: str | None = None
        self._probing = False
        self._warned_forged: set[str] = set()
        self._client_factory = client_factory or redis_client
        self._client: Any = None
        self._claim: Any = None
        self._extend: Any = None
        self._lookup: Any = None
        self._tag: str | None = None
        self._host = ""
        self._holds: Callable[[str], bool] = lambda tag: False
        #: Heir claims made here: (gone tag, bucket) -> when claimed.
        self._claims: dict[tuple[str, int], float] = {}
        self._greenlet: gevent.Greenlet | None = None
        self._down_until = 0.0
        self._down_since: float | None = None
        self.figures = {"lookups": 0, "unavailable": 0, "heir_claims": 0, "forged_entries": 0}

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None and self._off_reason is None

    def _entry(self, key: str) -> str:
        mac = hmac.new(self._secret, f"{key}\n{self.advertise_url}".encode("utf-8"), hashlib.sha256).hexdigest()
        return json.dumps({"url": self.advertise_url, "pid": os.getpid(), "mac": mac})

    def _url_of(self, key: str, raw: Any) -> tuple[bool, str | None]:
        """Whether the entry at ``key`` is there and this deployment's, and its URL."""
        if raw is None:
            return False, None
        try:
            entry = json.loads(raw)
            url, mac = entry.get("url"), entry.get("mac")
        except (ValueError, AttributeError):
            url, mac = None, None
        expected = hmac.new(self._secret, f"{key}\n{url}".encode("utf-8"), hashlib.sha256).hexdigest()
        if not isinstance(mac, str) or not hmac.compare_digest(mac, expected):
            self.figures["forged_entries"] += 1
            if key not in self._warned_forged and len(self._warned_forged) < 100:
                self._warned_forged.add(key)
                log.warning(
                    "The registry entry %s in Redis is not signed with this deployment's secret, so it is taken"
                    " for absent: another deployment may share this Redis and DOCSYNC_REDIS_PREFIX (give each its"
                    " own prefix), or its hosts have different DOCSYNC_SECRET_KEY values", key,
                )
            return False, None
        return True, url if isinstance(url, str) else None

    def _worker_key(self, tag: str) -> str:
        return f"{self.prefix}:worker:{tag}"

    def _host_key(self, host: str) -> str:
        return f"{self.prefix}:host:{host}"

    def _heir_key(self, tag: str, bucket: int) -> str:
        return f"{self.prefix}:heir:{tag}:{bucket}"

    def start(self, tag: str, host: str, holds: Callable[[str], bool]) -> None:
        """Enter this worker (``tag``, of ``host``) and keep its entry fresh.

        The first entry is written before this returns: a session this
        worker makes next must be found by a worker of another host that
        its WebSocket reaches a moment later.

        :param holds: ``holds(gone_tag)``: whether this worker still holds a
            session made by that gone worker (its heir claims are kept while
            it does).
        """
        if not self.enabled:
            return
        if not gevent.monkey.is_module_patched("socket"):
            # Every lookup would hold the whole process while Redis answers.
            self._off_reason = "the process is not monkey-patched by gevent"
            log.warning(
                "WebSockets are not routed between hosts: DOCSYNC_REDIS_URL needs gevent's monkey-patching in"
                " the serving process (gunicorn -k gevent, flask-docsync serve, or gevent.monkey.patch_all()"
                " before anything else is imported)"
            )
            return
        if self._greenlet is not None and self._tag == tag and not self._greenlet.dead:
            return
        self._tag = tag
        self._host = host
        self._holds = holds
        self._claims = {}
        try:
            self.refresh()
        except RegistryUnavailable:
            pass  # the loop tries again
        self._greenlet = gevent.spawn(self._refresh_loop)
        self._greenlet.name = "docsync-registry"

    def stop(self) -> None:
        """Leave the registry, so other hosts stop relaying here at once."""
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None
        if self._tag is not None and self.enabled:
            try:
                self._call(lambda client: client.delete(self._worker_key(self._tag or "")))
            except RegistryUnavailable:
                pass  # the entry expires by itself
        self._claims = {}

    def _connect(self) -> Any:
        if self._client is None:
            self._client = self._client_factory(self.redis_url, TIMEOUT, connect_timeout=TIMEOUT)
            self._claim = self._client.register_script(_CLAIM_HEIR)
            self._extend = self._client.register_script(_EXTEND_HEIR)
            self._lookup = self._client.register_script(_LOOKUP)
        return self._client

    def _call(self, func: Callable[[Any], Any]) -> Any:
        now = time.monotonic()
        if now < self._down_until or (self._down_since is not None and self._probing):
            # Down a moment ago, or another greenlet is finding out whether
            # it is back: nobody else waits for it meanwhile.
            self.figures["unavailable"] += 1
            raise RegistryUnavailable(f"Redis at {safe_url(self.redis_url)} did not answer a moment ago")
        probing = self._down_since is not None
        self._probing = self._probing or probing
        try:
            result = func(self._connect())
        except Exception as exc:
            if not is_connection_error(exc):
                log.error("The session registry in Redis at %s failed: %r", safe_url(self.redis_url), exc)
            elif self._down_since is None:
                self._down_since = now
                log.warning(
                    "Redis at %s cannot be reached (%s): WebSockets are routed within this host only, and"
                    " those for sessions of other hosts get fresh sessions until it is back",
                    safe_url(self.redis_url), exc,
                )
            # From when the failure was known: a call that failed by timing
            # out must not leave a back-off that has already run out.
            self._down_until = time.monotonic() + BACKOFF
            self.figures["unavailable"] += 1
            raise RegistryUnavailable(f"Redis at {safe_url(self.redis_url)} failed: {exc}") from None
        finally:
            if probing:
                self._probing = False
        if self._down_since is not None:
            log.warning("Redis at %s is reachable again after %.1f s: routing between hosts resumes",
                        safe_url(self.redis_url), time.monotonic() - self._down_since)
            self._down_since = None
        return result

    def _refresh_loop(self) -> None:
        while True:
            gevent.sleep(REFRESH)
            try:
                self.refresh()
            except RegistryUnavailable:
                pass
            except Exception:
                log.exception("Refreshing this worker's entry in the session registry failed")

    def refresh(self) -> None:
        """Write this worker's entry and its heir claims again (the loop calls it)."""
        tag = self._tag
        if tag is None:
            return
        now = time.monotonic()
        keep = [key for key, claimed in self._claims.items() if now - claimed < HEIR_GRACE or self._holds(key[0])]
        self._claims = {key: self._claims[key] for key in keep}

        def write(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.set(self._worker_key(tag), self._entry(self._worker_key(tag)), ex=TTL)
            pipe.set(self._host_key(self._host), self._entry(self._host_key(self._host)), ex=TTL)
            for gone, bucket in keep:
                self._extend(keys=[self._heir_key(gone, bucket)], args=[tag, HEIR_TTL], client=pipe)
            return pipe.execute()

        replies = self._call(write)
        for key, extended in zip(keep, replies[2:]):
            if not extended:  # another worker took it over while this one could not refresh
                self._claims.pop(key, None)

    def lookup(self, tag: str, host: str | None = None, bucket: int | None = None) -> Entry:
        """What the registry knows of worker ``tag`` (on ``host``) and of the heir of its ``bucket``.

        :raises RegistryUnavailable: Redis cannot be asked.
        """
        self.figures["lookups"] += 1
        keys = [self._worker_key(tag), self._host_key(host or ""), self._heir_key(tag, -1 if bucket is None else bucket)]
        worker, host_entry, heir, heir_entry = self._call(
            lambda client: self._lookup(keys=keys, args=[f"{self.prefix}:worker:"])
        )
        heir_tag = heir.decode("ascii", "replace") if isinstance(heir, bytes) else None
        alive, url = self._url_of(keys[0], worker)
        host_alive, host_url = self._url_of(keys[1], host_entry)
        heir_alive, heir_url = self._url_of(self._worker_key(heir_tag), heir_entry) if heir_tag else (False, None)
        return Entry(
            alive=alive,
            url=url,
            host_alive=host is not None and host_alive,
            host_url=host_url,
            heir=heir_tag if heir_alive else None,
            heir_url=heir_url,
        )

    def forget(self, tag: str) -> None:
        """Drop the entry of worker ``tag``, found gone (its hand-over socket or host refused)."""
        try:
            self._call(lambda client: client.delete(self._worker_key(tag)))
        except RegistryUnavailable:
            pass

    def claim_heir(self, gone: str, bucket: int, instead_of: str | None = None) -> str:
        """The tag of the worker that makes anew the sessions of worker ``gone`` in ``bucket``.

        This worker becomes it unless a live one already is.

        :param instead_of: An heir the caller found gone; it is replaced.
        :raises RegistryUnavailable: Redis cannot be asked.
        """
        tag = self._tag
        if tag is None:
            raise RegistryUnavailable("this worker has not entered the registry")
        heir = self._call(lambda client: self._claim(
            keys=[self._heir_key(gone, bucket)],
            args=[tag, HEIR_TTL, f"{self.prefix}:worker:", instead_of or ""],
        ))
        heir = heir.decode("ascii", "replace") if isinstance(heir, bytes) else str(heir)
        if heir == tag and (gone, bucket) not in self._claims:
            self._claims[(gone, bucket)] = time.monotonic()
            self.figures["heir_claims"] += 1
        return heir

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "available": self.enabled and self._down_since is None,
            "off": self._off_reason,
            "advertise_url": self.advertise_url,
            "heir_claims_held": len(self._claims),
            **self.figures,
        }
