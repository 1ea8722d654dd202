"""Sessions that outlive their worker: what the browser changed, saved in Redis and replayed.

Opt-in (``DOCSYNC_RESTORE_SESSIONS``, or ``add_app(..., restore=True)``).
While a session lives, a :class:`Recorder` keeps the latest value of each
property the *browser* set (from the PATCH-DOCs it sent), plus the state the
app declared with :func:`restorable`; a flusher writes the sessions that
changed to one Redis hash each, every ``DOCSYNC_RESTORE_FLUSH_MS``. A
graceful stop saves every session before any WebSocket is closed.

When a reconnect finds the session's worker gone, the heir (see
:mod:`flask_docsync.routing`) runs the app again, hands it the saved state,
checks that the document it built has the structure the saved one had, and
replays the browser's values as if the browser had sent them again, under
the document lock, so the app's callbacks fire in the original order. BokehJS
then pulls the whole document, so new model ids are fine.

**Models are named by rank.** Bokeh ids are a per-process counter (``p1001``,
``p1002``, ...), so a document built again elsewhere has other ids, but
sorted by id its models come in creation order. A recorded change names its
model by its rank in the document's live models *just before the message
that carried it was applied*, and a replay resolves the rank at the same
point; a callback that rebuilds a figure removes and adds models the same
way on both sides, so later changes land on the same models. A newer value
replaces an older one only within an *epoch*, between two messages that
changed the set of models, so that no change moves across a rebuild.

**Never half-restored.** The saved data carries a fingerprint of the app
(a hash of its script or function source), two skeletons (the model types
in creation order, hashed): the document as the app first built it, and as
it was at the last save, and a hash of the values the browser set since the
last rebuild as the document held them at the save. A restore that finds
another app fingerprint, a first skeleton that differs, a rank that does not
exist, a replayed change that raises, a final skeleton or values that differ
is abandoned: the session is made fresh, with one log line, and the figure
of the reason is counted.

**What is recorded, and what is not** (a skip is logged at INFO the first
time a session of the app meets its reason, at DEBUG once per later session,
and counted as ``skipped``):

- ``ModelChanged`` of a property to a plain value, or to a reference to a
  model that exists: recorded (sliders, selects, text inputs, ranges of a
  zoom or pan, a selection's indices, a whole ``data`` set by the browser).
- ``ColumnsPatched`` (a ``DataTable`` cell edit): recorded per cell, the
  latest value of each ``(source, column, row)``; a patch with slices is
  kept whole, in order. A later ``data`` change of the same source drops the
  patches made before it.
- ``TitleChanged``: recorded.
- Values holding binary buffers, or models the browser created: skipped.
- ``ColumnsStreamed``, ``RootAdded``/``RootRemoved`` from the browser: skipped.
- UI events (``MessageSent``: button clicks, taps, key presses): skipped,
  since replaying them repeats their side effects; keep what a click changes
  in :func:`restorable` state. ``document_ready`` is re-sent by the browser
  itself and dropped silently.

**Stored** as one Redis hash per session, ``<prefix>:restore:<route>:<session
id>``: ``meta`` (JSON: format, app fingerprint, an HMAC of the session's
user, both skeletons, the values hash), ``changes`` (JSON: ``[key, message
number, value]`` in the order of their last change), ``state`` (the app's
JSON) and ``owner`` (the writing :class:`Restorer`'s random id). Writes and
deletes are conditional (:data:`WRITE_SCRIPT`, :data:`DELETE_SCRIPT`): a
writer writes a key that is absent or its own, deletes only its own, and a
session's first write claims the key, so two copies of one session do not
undo each other. A restore for another user than the saved one is refused.
Its TTL is the unused-session lifetime plus a
cleanup pass plus :data:`RECONNECT_GRACE_MS`, refreshed while the session
lives; a session discarded as unused deletes it (its browser has gone), a
graceful stop keeps it. Only sessions whose document lock was released since
the last flush are looked at, so an idle flush costs nothing. The saved data
is capped per session (``DOCSYNC_RESTORE_MAX_BYTES``), and restores take
turns (``DOCSYNC_RESTORE_CONCURRENCY``).

This module imports no Flask and no WebSocket code.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import secrets
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import gevent
import gevent.lock
import gevent.monkey

from . import compat
from .errors import ConfigurationError, TokenError

if TYPE_CHECKING:
    from bokeh.document import Document

    from .context import ApplicationContext
    from .session import ServerSession

log = logging.getLogger(__name__)

#: Version of the saved layout; data of another version is not restored.
FORMAT = 1
#: How long a reconnect waits for a restore slot before it gets a fresh
#: session instead: BokehJS gives up after about 30 s of retries, and a
#: fresh session the user can use beats a page that never comes back.
RESTORE_WAIT_SECONDS = 20.0
#: Added to the unused-session lifetime for the TTL of a session's saved
#: data: the browser's reconnect attempts span about 30 s after its worker
#: died, and the heir may be busy restoring others first.
RECONNECT_GRACE_MS = 60_000
#: Sessions a flush snapshots between yields to the event loop: each takes
#: tens of microseconds, and a burst of many changed sessions must not hold
#: the loop for all of them at once.
SNAPSHOTS_PER_YIELD = 100
#: Marks a model reference inside a recorded value: ``{RANK: n}``.
RANK = "docsync:rank"
#: UI events the browser sends again by itself after a reconnect.
_RESENT_EVENTS = frozenset({"document_ready"})
#: Document event kinds a skip reason may name; any other kind a client
#: sends is "an unknown event kind" (reasons are kept per session and
#: logged: they must not be text a client chose).
_NAMED_KINDS = frozenset({"ColumnsStreamed", "RootAdded", "RootRemoved", "ColumnDataChanged"})
#: Distinct skip reasons kept (and logged) per session.
MAX_SKIP_REASONS = 16


def _ui_event_names() -> frozenset[str]:
    try:
        from bokeh import events

        return frozenset(n for n in getattr(events, "_CONCRETE_EVENT_CLASSES", {}) if isinstance(n, str))
    except Exception:  # a Bokeh without it: reasons then name no event
        return frozenset()


_UI_EVENTS = _ui_event_names()


def _clip(text: str, limit: int = 80) -> str:
    """``text`` made safe for a log line: escaped (no line breaks) and cut at ``limit``."""
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."
_PLAIN = (str, int, float, bool, type(None))
#: Writes a session's data (``KEYS[1]``) if the key is absent, owned by this
#: writer (``ARGV[1]``), or claimed (``ARGV[2] == "1"``): then the whole hash
#: is replaced, stamped with the owner, and given the TTL ``ARGV[3]``; the
#: fields and values follow. Two copies of one session (a worker taken for
#: gone, a late save at a stop) must not overwrite each other's data.
WRITE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'owner')
if current and current ~= ARGV[1] and ARGV[2] ~= '1' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
#: Deletes a session's data only if this writer (``ARGV[1]``) owns it.
DELETE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class NotFaithful(Exception):
    """A restore cannot rebuild the session as it was; the reason is the message."""


# -- ranks and skeletons ------------------------------------------------------


def _creation_order(model_id: str) -> tuple[int, Any]:
    # Bokeh's simple ids, "p" and a process-wide counter: numeric order is
    # creation order ("p999" < "p1000"). Anything else sorts after, by text.
    if model_id[:1] == "p" and model_id[1:].isdigit():
        return (0, int(model_id[1:]))
    return (1, model_id)


class Ranks:
    """The models of a document in creation order: ``ids[rank]`` and ``rank[id]``."""

    __slots__ = ("source", "ids", "rank", "models", "_skeleton")

    def __init__(self, doc: Document) -> None:
        table = compat.model_table(doc)
        #: The document's model dict this was computed from: Bokeh replaces
        #: it whenever the set of models changes, so identity tells staleness.
        self.source = table
        self.ids = sorted(table, key=_creation_order)
        self.rank = {model_id: n for n, model_id in enumerate(self.ids)}
        self.models = table
        self._skeleton: str | None = None

    def fresh_for(self, doc: Document) -> bool:
        return compat.model_table(doc) is self.source

    def skeleton(self) -> str:
        """A hash of the model types in creation order."""
        if self._skeleton is None:
            h = hashlib.sha1()
            for model_id in self.ids:
                h.update(self.models[model_id].__qualified_model__.encode())
                h.update(b"\n")
            self._skeleton = f"{len(self.ids)}:{h.hexdigest()[:20]}"
        return self._skeleton


def skeleton(doc: Document) -> str:
    """The skeleton of ``doc``: its model count and a hash of its model types in creation order."""
    return Ranks(doc).skeleton()


def app_fingerprint(application: Any) -> str:
    """A hash of what the app runs: the source of each handler's script or
    function (its code when the source cannot be read).

    A deploy that changes the script changes it, and a restore then gives a
    fresh session: the recorded ranks belong to the old script's document.
    """
    h = hashlib.sha1()
    for handler in getattr(application, "handlers", ()):
        h.update(type(handler).__qualname__.encode())
        h.update(compat.handler_source(handler))
    return h.hexdigest()[:20]


# -- values -------------------------------------------------------------------


class _Unsupported(Exception):
    pass


def _to_ranks(value: Any, rank: Mapping[str, int]) -> Any:
    """``value`` (Bokeh's JSON) with model references replaced by ranks.

    :raises _Unsupported: naming what cannot be saved: a model the browser
        defined, or a reference to a binary buffer.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list):
        return [_to_ranks(v, rank) for v in value]
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "object":
            raise _Unsupported("a model the browser created")
        if (kind is None or kind == "ref") and "id" in value:
            n = rank.get(value["id"])
            if n is None:
                raise _Unsupported("a binary buffer or an unknown model")
            return {RANK: n}
        return {k: _to_ranks(v, rank) for k, v in value.items()}
    raise _Unsupported(f"a {type(value).__name__}")


def _from_ranks(value: Any, ids: list[str]) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list):
        return [_from_ranks(v, ids) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and RANK in value:
            n = value[RANK]
            if not isinstance(n, int) or not 0 <= n < len(ids):
                raise NotFaithful(f"a saved value names model #{n}, and the document has {len(ids)}")
            return {"id": ids[n]}
        return {k: _from_ranks(v, ids) for k, v in value.items()}
    return value


def user_mac(secret: bytes | None, user: Any) -> str | None:
    """What a session's saved data keeps of its user (what the app's
    authorize hook returned): an HMAC over a stable text form, never the
    value itself; ``None`` for no user (authorize off)."""
    if user is None:
        return None
    text = f"{type(user).__name__}:{user}" if isinstance(user, (str, int)) else f"repr:{user!r}"
    return hmac.new(secret or b"", text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def _size(value: Any) -> int:
    """About how many bytes ``value`` takes in the saved JSON (cheap for plain values)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, _PLAIN):
        return 8
    return len(json.dumps(value, separators=(",", ":")))


# -- the recorder ---------------------------------------------------------------


class Recorder:
    """What the browser changed in one session, and the app's declared state.

    Entries are kept in the order of their last change, under keys that make
    a newer value replace an older one of the same epoch (see :meth:`commit`):
    ``(epoch, "set", rank, attr)``, ``(epoch, "cell", rank, attr, column,
    row)``, ``(epoch, "patch", rank, attr, n)`` (a patch with slices, kept
    whole), ``(epoch, "title")``. Each entry remembers the *group* (the
    message) it came from, since ranks are resolved once per message.

    :param session: The session recorded; held weakly.
    :param key: Its Redis key.
    :param max_bytes: Cap on the saved data (about, in JSON bytes): what a
        client sends is bounded only by what it sends, and every flush
        rewrites it. Beyond it the session stops being saved (logged once)
        and a restore gives a fresh session.
    """

    def __init__(self, session: ServerSession, key: str, max_bytes: int) -> None:
        self._session = weakref.ref(session)
        self.key = key
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict[tuple[Any, ...], tuple[int, Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.group = 0
        #: Incremented when a recorded message changed the set of models (see commit).
        self.epoch = 0
        self._before: dict[str, Any] | None = None
        self._patches = 0
        self._ranks: Ranks | None = None
        #: Whether there is something not yet written to Redis.
        self.dirty = False
        #: Whether the key holds data (so discarding the session deletes it).
        self.saved = False
        #: The next write takes the key whoever owns it: a new session (also
        #: one made again for an id another copy saved), a restored one.
        #: Later writes go through only while this worker owns the key.
        self.claim = True
        #: Too large to save: nothing more is recorded.
        self.overflowed = False
        #: Not written while a restore replays into the session: a restore
        #: that fails must leave nothing of itself in Redis.
        self.paused = False
        self._skipped: set[str] = set()
        self.skipped = 0
        self._state_json: str | None = None
        #: The app's route, and the (route, reason) pairs already logged at
        #: INFO by any session of this process (``None``: log every session's).
        self.route = ""
        self.logged: set[tuple[str, str]] | None = None
        #: ``wake(recorder)``: tells the restorer this session may have
        #: something to save (see :meth:`touched`); ``None`` tells nobody.
        self.wake: Any = None
        doc = session.document
        self.first_skeleton = self.ranks(doc).skeleton()
        self.app = ""
        #: :func:`user_mac` of the session's user, saved so that a restore
        #: goes to that user only.
        self.user: str | None = None

    @property
    def session(self) -> ServerSession | None:
        return self._session()

    def ranks(self, doc: Document) -> Ranks:
        ranks = self._ranks
        if ranks is None or not ranks.fresh_for(doc):
            ranks = self._ranks = Ranks(doc)
        return ranks

    def prepare(self, content: Mapping[str, Any], doc: Document) -> list[tuple[tuple[Any, ...], Any, int]] | None:
        """The entries of one PATCH-DOC's content, with ranks as they are now.

        Called before the patch is applied; :meth:`commit` keeps them once it
        applied without error. ``None`` when nothing in it is recorded.
        """
        if self.overflowed:
            return None
        events = content.get("events")
        if not isinstance(events, list):
            return None
        # Compared in commit(): did applying this message change the models?
        self._before = compat.model_table(doc)
        out: list[tuple[tuple[Any, ...], Any, int]] = []
        rank: Mapping[str, int] | None = None
        for event in events:
            if not isinstance(event, dict):
                continue
            kind = event.get("kind")
            try:
                if kind == "ModelChanged":
                    if rank is None:
                        rank = self.ranks(doc).rank
                    n = rank.get((event.get("model") or {}).get("id"))  # type: ignore[union-attr]
                    if n is None:
                        raise _Unsupported("a change of a model the browser created")
                    attr = event.get("attr")
                    if not isinstance(attr, str):
                        raise _Unsupported("a malformed event")
                    new = event.get("new")
                    value = new if isinstance(new, _PLAIN) else _to_ranks(new, rank)
                    out.append((("set", n, attr), value, _size(value) + 24))
                elif kind == "ColumnsPatched":
                    if rank is None:
                        rank = self.ranks(doc).rank
                    n = rank.get((event.get("model") or {}).get("id"))  # type: ignore[union-attr]
                    if n is None:
                        raise _Unsupported("a patch of a source the browser created")
                    patches = _to_ranks(event.get("patches"), rank)
                    attr = event.get("attr", "data")
                    if not isinstance(attr, str):
                        raise _Unsupported("a malformed event")
                    out.extend(self._cells(n, attr, patches))
                elif kind == "TitleChanged":
                    title = event.get("title")
                    out.append((("title",), title, _size(title)))
                elif kind == "MessageSent":
                    data = event.get("msg_data")
                    name = data.get("name") if isinstance(data, dict) else None
                    if name not in _RESENT_EVENTS:
                        raise _Unsupported(f"UI events ({name})" if name in _UI_EVENTS else "UI events")
                elif kind in _NAMED_KINDS:
                    raise _Unsupported(f"{kind} from the browser")
                else:
                    raise _Unsupported("an unknown event kind")
            except _Unsupported as exc:
                self._skip(str(exc))
            except (AttributeError, TypeError, KeyError, ValueError):
                # Malformed: Bokeh refuses it when it applies the patch; the
                # recorder must not be what fails.
                self._skip("a malformed event")
        return out or None

    def _cells(self, n: int, attr: Any, patches: Any) -> list[tuple[tuple[Any, ...], Any, int]]:
        # BokehJS sends the patches as a map ({"type": "map", "entries":
        # [[column, changes], ...]}, what its DataTable editor's
        # source.patch() makes); Python clients as a plain object.
        if isinstance(patches, dict) and patches.get("type") == "map":
            columns = patches.get("entries") or []
        elif isinstance(patches, dict) and "type" not in patches:
            columns = list(patches.items())
        else:
            raise _Unsupported("a patch in an unknown form")
        out: list[tuple[tuple[Any, ...], Any, int]] = []
        whole: dict[str, Any] = {}
        for pair in columns:
            if not (isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise _Unsupported("a patch in an unknown form")
            column, changes = pair
            if not isinstance(changes, list):
                whole[column] = changes
                continue
            for change in changes:
                if (isinstance(change, list) and len(change) == 2 and isinstance(change[0], int)
                        and not isinstance(change[0], bool)):
                    # One cell: a later edit of it replaces this one.
                    out.append((("cell", n, attr, column, change[0]), change[1], _size(change[1]) + 24))
                else:
                    whole.setdefault(column, []).append(change)
        if whole:
            self._patches += 1
            out.append((("patch", n, attr, self._patches), whole, _size(whole) + 24))
        return out

    def commit(self, entries: list[tuple[tuple[Any, ...], Any, int]], doc: Document) -> None:
        """Keep entries from :meth:`prepare`: the patch they came from was applied to ``doc``.

        A newer value replaces an older one of the same key only within an
        *epoch*: the stretch between two messages whose callbacks changed
        the set of models (a select that rebuilds a figure). Across one, the
        older entries stay where they are, so the replay goes through the
        same structures in the same order (select, zoom of the figure it
        built, select again, zoom of the next one), and ranks keep naming
        the models they named.
        """
        self.group += 1
        group = self.group
        epoch = self.epoch
        table = self.entries
        for key, value, size in entries:
            if key[0] == "set" and key[2] == "data":
                # A new data set wholesale: earlier patches of it are moot.
                for old in [k for k in table if k[0] == epoch and k[1] in ("cell", "patch") and k[2] == key[1]]:
                    self.bytes -= table.pop(old)[2]
            full = (epoch, *key)
            old = table.pop(full, None)
            if old is not None:
                self.bytes -= old[2]
            table[full] = (group, value, size)
            self.bytes += size
        before, self._before = self._before, None
        after = compat.model_table(doc)
        # Bokeh makes a new table whenever it recomputes, also for the same
        # models; only another set of models starts an epoch.
        if before is not None and after is not before and after.keys() != before.keys():
            self.epoch += 1
        self.dirty = True
        if self.bytes > self.max_bytes:
            self.overflow()
        self.touched()

    def touched(self) -> None:
        """App code ran in this session (the document lock was released):
        its declared state may have changed, so the next flush looks at it.

        Called for every release of the lock, so it only queues: a flush
        looks at queued sessions alone instead of all of them.
        """
        wake = self.wake
        if wake is not None:
            wake(self)

    def overflow(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        self.entries.clear()
        self.bytes = 0
        self.dirty = True
        session = self.session
        log.warning(
            "Session %s: its saved changes passed DOCSYNC_RESTORE_MAX_BYTES (%d bytes); it is no longer"
            " saved, and a restore after its worker dies gives a fresh session. Raise the limit if"
            " this app's sessions are meant to be this large.",
            session.id if session is not None else "?", self.max_bytes,
        )

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        reason = _clip(reason, 120)
        if reason in self._skipped or len(self._skipped) >= MAX_SKIP_REASONS:
            return
        self._skipped.add(reason)
        session = self.session
        session_id = session.id if session is not None else "?"
        logged = self.logged
        if logged is not None and (self.route, reason) in logged:
            # Said at INFO for the app's first session already: every session
            # of a page with a button would repeat it.
            log.debug("Session %s: %s cannot be restored after a worker dies; not saved", session_id, reason)
            return
        if logged is not None:
            if len(logged) < 1000:  # bounded: reasons name event kinds, and clients choose those
                logged.add((self.route, reason))
        log.info("Session %s: %s cannot be restored after a worker dies; not saved (later sessions of %s:"
                 " at DEBUG)", session_id, reason, self.route)

    def values_check(self, doc: Document) -> str:
        """A hash of the current values of the plain properties the browser
        set since the last rebuild (the current epoch, where ranks name the
        models they named when recorded).

        Saved with the data and compared after a replay: the skeleton tells
        the same types in the same order, this that the replayed values
        landed where they were set, and that the callbacks made of them what
        they had (a clamped value, a property one derives from another).
        """
        ranks = self.ranks(doc)
        epoch = self.epoch
        seen = []
        for key in self.entries:
            if key[0] != epoch or key[1] != "set":
                continue
            n, attr = key[2], key[3]
            if not 0 <= n < len(ranks.ids):
                seen.append([n, attr, "missing"])
                continue
            value = getattr(ranks.models[ranks.ids[n]], attr, None)
            if isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
                value = list(value)
            elif not isinstance(value, _PLAIN):
                continue  # models, data columns: the skeleton and the replay itself check those
            seen.append([n, attr, value])
        return hashlib.sha1(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()[:20]

    # -- the app's state ------------------------------------------------------

    def state_json(self) -> str | None:
        """The app's declared state as JSON, or ``None`` if it declared none."""
        session = self.session
        doc = session.document if session is not None and not session.destroyed else None
        context = doc.session_context if doc is not None else None
        state = getattr(context, "_docsync_state", None)
        if state is None:
            return self._state_json
        try:
            return json.dumps(state, separators=(",", ":"), sort_keys=True)
        except (TypeError, ValueError) as exc:
            self._skip(f"the app's restorable state ({_clip(str(exc))})")
            return self._state_json

    def snapshot(self) -> dict[str, str] | None:
        """The fields to write if anything changed since the last save, else ``None``.

        Resolves the current skeleton, so call it where the document is not
        being changed (the flusher runs between messages, on the event loop).
        """
        if self.paused:
            return None
        session = self.session
        ranks = self._ranks
        if ranks is not None and session is not None and not session.destroyed and not ranks.fresh_for(session.document):
            # A stale table holds the models the document has dropped since.
            self._ranks = None
        state = self.state_json()
        if not self.dirty and state == self._state_json:
            return None
        if session is None or session.destroyed:
            return None
        if self.overflowed:
            fields = {"meta": json.dumps({"format": FORMAT, "overflowed": True})}
        else:
            changes = [[list(key[1:]), group, value] for key, (group, value, _) in self.entries.items()]
            fields = {
                "meta": json.dumps({
                    "format": FORMAT, "app": self.app, "user": self.user, "first": self.first_skeleton,
                    "last": self.ranks(session.document).skeleton(),
                    "values": self.values_check(session.document),
                }),
                "changes": json.dumps(changes, separators=(",", ":")),
                "state": state if state is not None else "null",
            }
            if sum(len(v) for v in fields.values()) > self.max_bytes:
                self.overflow()
                fields = {"meta": json.dumps({"format": FORMAT, "overflowed": True})}
        self.dirty = False
        self._state_json = state
        return fields


# -- replay -------------------------------------------------------------------


def _event_json(key: list[Any], value: Any, ids: list[str]) -> dict[str, Any]:
    kind = key[0]
    if kind == "title":
        return {"kind": "TitleChanged", "title": value}
    n = key[1]
    if not isinstance(n, int) or not 0 <= n < len(ids):
        raise NotFaithful(f"a saved change names model #{n}, and the document has {len(ids)}")
    model = {"id": ids[n]}
    if kind == "set":
        return {"kind": "ModelChanged", "model": model, "attr": key[2], "new": _from_ranks(value, ids)}
    if kind == "cell":
        return {"kind": "ColumnsPatched", "model": model, "attr": key[2],
                "patches": {key[3]: [[key[4], _from_ranks(value, ids)]]}}
    if kind == "patch":
        return {"kind": "ColumnsPatched", "model": model, "attr": key[2], "patches": _from_ranks(value, ids)}
    raise NotFaithful(f"an unknown kind of saved change {kind!r}")


def replay(session: ServerSession, changes: list[Any]) -> int:
    """Apply saved ``changes`` to the session's document as if its browser
    sent them: one patch per recorded message, under the document lock, with
    the session as setter, so callbacks fire in the original order and the
    session's recorder records them again.

    :return: The number of changes replayed.
    :raises NotFaithful: when a change cannot be applied as recorded.
    """
    doc = session.document
    recorder = session.recorder
    count = 0
    group_events: list[dict[str, Any]] = []
    current: Any = object()

    def apply(events: list[dict[str, Any]]) -> None:
        content = {"events": events}
        pending = recorder.prepare(content, doc) if recorder is not None else None
        try:
            doc.apply_json_patch(content, setter=session)
        except Exception as exc:
            raise NotFaithful(f"a saved change did not apply again ({type(exc).__name__}: {exc})") from exc
        if pending is not None and recorder is not None:
            recorder.commit(pending, doc)

    with session.locked(), compat.curdoc_as(doc):
        ids: list[str] = []
        for entry in changes:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list) and entry[0]):
                raise NotFaithful("the saved changes are malformed")
            key, group, value = entry
            if group != current:
                if group_events:
                    apply(group_events)
                    group_events = []
                current = group
                # Ranks as they were just before this message came: the
                # recorder's table while the set of models is the same one.
                ids = recorder.ranks(doc).ids if recorder is not None else Ranks(doc).ids
            group_events.append(_event_json(key, value, ids))
            count += 1
        if group_events:
            apply(group_events)
    return count


def _flush_loop(ref: weakref.ReferenceType[Restorer], interval: float) -> None:
    """Flush every ``interval`` seconds while the restorer exists and runs.

    Holds it weakly between passes, as the server's own loops do, so that a
    server dropped without ``stop()`` is freed and this greenlet ends.
    """
    while True:
        gevent.sleep(interval)
        restorer = ref()
        if restorer is None or restorer._stopped:
            return
        restorer._flush_once()
        del restorer


# -- the app's API ----------------------------------------------------------------


def restorable(defaults: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """In an app script: a dict of the session's own state that survives its worker.

    .. code-block:: python

        from flask_docsync import restorable

        state = restorable(clicks=0, note="")

        def on_click():
            state["clicks"] += 1
            counter.text = f"{state['clicks']} clicks"

    In a session being restored, it holds the values saved (over the
    defaults) when the script runs again; otherwise a copy of the defaults.
    Whatever it holds at a save is saved (as JSON: strings, numbers, lists,
    dicts; a value that is not JSON is logged and the last good state kept).
    Calling it again in the same session returns the same dict, with any new
    defaults added.

    Build the document's *structure* from the defaults, not from the state:
    a restore checks that the document built again has the same models as
    the first one had, and otherwise gives a fresh session. Set values from
    the state freely (texts, a counter, a slider's start).

    Outside a session served with restore on (a plain ``bokeh serve``, a
    test), it returns a plain copy of the defaults and nothing is saved.
    """
    from bokeh.io import curdoc

    merged = dict(defaults or {}, **more)
    context = curdoc().session_context
    if context is None:
        return merged
    state = getattr(context, "_docsync_state", None)
    if state is None:
        saved = getattr(context, "_docsync_saved_state", None)
        state = dict(merged)
        if isinstance(saved, dict):
            state.update(saved)
        try:
            context._docsync_state = state
        except AttributeError:  # a session context of another server
            return state
    else:
        for key, value in merged.items():
            state.setdefault(key, value)
    return state


def restoring() -> bool:
    """In an app script: whether this run rebuilds a session whose worker died.

    True while the script runs again and while the saved changes are
    replayed (so a callback can tell a replayed change from a new one);
    false afterwards, and in every other session.
    """
    from bokeh.io import curdoc

    return getattr(curdoc().session_context, "_docsync_saved_state", None) is not None


# -- the server's side --------------------------------------------------------------


class Saved:
    """What Redis held for one session, handed to the app context that rebuilds it."""

    def __init__(self, restorer: Restorer, key: str, fields: dict[str, str]) -> None:
        self.restorer = restorer
        self.key = key
        # All of it, of the right types, or nothing: a truncated or damaged
        # hash must not pass for a session that had no changes or no state.
        if "meta" not in fields:
            raise ValueError("the saved data has no meta")
        meta = json.loads(fields["meta"])
        if not isinstance(meta, dict):
            raise ValueError("the saved meta is not an object")
        self.meta: dict[str, Any] = meta
        self.changes: list[Any] = []
        self.state: dict[str, Any] | None = None
        if not meta.get("overflowed"):  # then check_before refuses it anyway
            for name in ("changes", "state"):
                if name not in fields:
                    raise ValueError(f"the saved data has no {name}")
            changes = json.loads(fields["changes"])
            if not isinstance(changes, list):
                raise ValueError("the saved changes are not a list")
            state = json.loads(fields["state"])
            if state is not None and not isinstance(state, dict):
                raise ValueError("the saved state is not an object")
            self.changes, self.state = changes, state
        #: Why the restore was abandoned; ``None`` while it goes well.
        self.failure: str | None = None

    def check_before(self, application_fingerprint: str) -> None:
        """Refuse data of another format or another app before the app runs.

        :raises NotFaithful: with the reason.
        """
        if self.meta.get("overflowed"):
            raise NotFaithful("its saved changes passed DOCSYNC_RESTORE_MAX_BYTES")
        if self.meta.get("format") != FORMAT:
            raise NotFaithful(f"the saved data has format {self.meta.get('format')!r}, this server {FORMAT}")
        if self.meta.get("app") != application_fingerprint:
            raise NotFaithful("the app's source changed since the session was saved")

    def rebuild(self, session: ServerSession) -> int:
        """Check the document the app built, replay the changes (under the
        document lock), and check the result against the saved skeleton.

        :raises NotFaithful: with the reason.
        """
        recorder = session.recorder
        first = recorder.first_skeleton if recorder is not None else skeleton(session.document)
        if first != self.meta.get("first"):
            raise NotFaithful(f"the app built another document (skeleton {first}, saved {self.meta.get('first')})")
        if recorder is not None:
            recorder.paused = True
        try:
            count = replay(session, self.changes)
            last = skeleton(session.document)
            if last != self.meta.get("last"):
                raise NotFaithful(f"the replayed document differs from the saved one (skeleton {last},"
                                  f" saved {self.meta.get('last')})")
            if recorder is not None and recorder.values_check(session.document) != self.meta.get("values"):
                raise NotFaithful("the replayed values differ from the saved ones (the app's callbacks"
                                  " made something else of them, or they landed on other models)")
        finally:
            if recorder is not None:
                recorder.paused = False
        if recorder is not None:
            # The key holds this session's data (the replay recorded it
            # again, and writes it at the next flush).
            recorder.saved = True
            recorder.dirty = True
            recorder.touched()
        return count


class Restorer:
    """Saving and restoring the sessions of one server (one Flask app's DocSync in a process).

    Connects to Redis on first use. Its flusher greenlet starts with the
    first recorded session.

    :param redis_url: ``DOCSYNC_REDIS_URL``; required.
    :param prefix: ``DOCSYNC_REDIS_PREFIX``.
    :param flush_ms: How often changed sessions are written: what a
        ``kill -9`` loses at most.
    :param concurrency: Restores at a time in this process; the others
        wait (up to :data:`RESTORE_WAIT_SECONDS`, then get a fresh session),
        so that a dead worker's thousand sessions do not stall the
        survivors' own.
    :param max_bytes: Per-session cap on saved data.
    :param ttl_ms: Lifetime of a session's saved data after its last
        write or refresh; the flusher refreshes it while the session lives.
    :param client_factory: ``client_factory(url, timeout)`` returns a
        ``redis.Redis``; ``None`` uses redis-py's (as broadcasts do).
    :param secret: The deployment's secret key (``DOCSYNC_SECRET_KEY``):
        a session's user is saved as an HMAC keyed with it.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str = "docsync",
        flush_ms: int = 300,
        concurrency: int = 2,
        max_bytes: int = 256 * 1024,
        ttl_ms: int = 90_000,
        client_factory: Any = None,
        secret: bytes | None = None,
    ) -> None:
        self.redis_url = redis_url
        #: The deployment's secret key: keys the HMAC of each session's user.
        self.secret = secret
        #: Stamped on the data this process writes (see :data:`WRITE_SCRIPT`).
        self.owner = secrets.token_hex(8)
        self.prefix = prefix
        self.flush_ms = flush_ms
        self.max_bytes = max_bytes
        self.ttl_ms = ttl_ms
        self._client_factory = client_factory
        self._client: Any = None
        self._slots = gevent.lock.BoundedSemaphore(concurrency)
        self.concurrency = concurrency
        self._recorders: weakref.WeakValueDictionary[str, Recorder] = weakref.WeakValueDictionary()
        #: Recorders a flush looks at (see Recorder.touched).
        self._touched: set[Recorder] = set()
        self._logged_skips: set[tuple[str, str]] = set()
        #: ``(key, owner)``: deleted if ``owner`` owns it (``None``: whoever does).
        self._deletes: list[tuple[str, str | None]] = []
        self._flusher: gevent.Greenlet | None = None
        self._last_touch = 0.0
        self._stopped = False
        self._error_logged_at = 0.0
        #: ``saved``: writes of a session's data; ``restored``: sessions
        #: rebuilt; ``replayed``: changes replayed; ``nothing_saved``:
        #: reconnects of gone workers' sessions with nothing in Redis;
        #: ``fresh_because_mismatch``: abandoned restores (another app or
        #: structure, a change that did not apply); ``fresh_because_busy``:
        #: no restore slot in time; ``fresh_because_error``: Redis failed;
        #: ``too_large``: sessions past the byte cap; ``skipped``: browser
        #: changes not recordable; ``save_errors``: failed flushes.
        self.figures: collections.Counter[str] = collections.Counter()
        self.restore_seconds = 0.0
        self.waiting = 0
        from bokeh.settings import settings as bokeh_settings

        if not bokeh_settings.simple_ids():
            log.warning(
                "BOKEH_SIMPLE_IDS is off: model ids are random, so they do not give the models' creation"
                " order, and every restore will start a fresh session. Unset BOKEH_SIMPLE_IDS to restore."
            )

    def key(self, route: str, session_id: str) -> str:
        return f"{self.prefix}:restore:{route}:{session_id}"

    def check(self) -> None:
        """Refuse to run where Redis calls would block the whole process.

        :raises ConfigurationError: without gevent's monkey-patching (unless
            a client factory was given, as tests do).
        """
        if self._client_factory is None and not gevent.monkey.is_module_patched("socket"):
            raise ConfigurationError(
                "DOCSYNC_RESTORE_SESSIONS needs gevent's monkey-patching in the serving process, or"
                " its Redis calls would stop every session: gunicorn -k gevent and flask-docsync serve"
                " do it; with gevent.pywsgi, call gevent.monkey.patch_all() before anything else."
            )

    def _redis(self) -> Any:
        if self._client is None:
            self.check()
            from .pubsub import redis_client

            factory = self._client_factory or redis_client
            self._client = factory(self.redis_url, 5.0)
        return self._client

    # -- recording --------------------------------------------------------------

    def attach(self, session: ServerSession, context: ApplicationContext) -> Recorder:
        """Record ``session`` (just built by ``context``) from now on."""
        recorder = Recorder(session, self.key(context.url, session.id), self.max_bytes)
        recorder.app = context.app_fingerprint
        session_context = session.document.session_context if session.document is not None else None
        request = getattr(session_context, "request", None)
        recorder.user = user_mac(self.secret, getattr(request, "user", None) if request is not None else None)
        recorder.route = context.url
        recorder.logged = self._logged_skips
        recorder.wake = self._wake
        session.recorder = recorder
        self._recorders[recorder.key] = recorder
        # The app script may have declared state already.
        self._touched.add(recorder)
        if (self._flusher is None or self._flusher.dead) and not self._stopped:
            self._flusher = gevent.spawn(_flush_loop, weakref.ref(self), self.flush_ms / 1000.0)
            self._flusher.name = "docsync-restore-flush"
        return recorder

    def _wake(self, recorder: Recorder) -> None:
        # Through the attribute: a flush swaps the set for a new one.
        self._touched.add(recorder)

    def forget(self, session: ServerSession) -> None:
        """The session was discarded for good: its saved data goes too.

        Not while the server stops: then the data is what a restore needs.
        """
        recorder = session.recorder
        if recorder is None:
            return
        session.recorder = None
        recorder.wake = None
        self._touched.discard(recorder)
        if self._recorders.get(recorder.key) is recorder:
            del self._recorders[recorder.key]
        self.figures["skipped_gone"] += recorder.skipped
        if recorder.saved and not self._stopped:
            self._deletes.append((recorder.key, self.owner))

    def _flush_once(self) -> None:
        try:
            self.flush()
        except Exception as exc:
            self.figures["save_errors"] += 1
            now = time.monotonic()
            if now - self._error_logged_at > 30:
                self._error_logged_at = now
                log.warning("Saving sessions for restore failed (%s: %s); retrying every %d ms",
                            type(exc).__name__, exc, self.flush_ms)

    def flush(self, everyone: bool = False) -> int:
        """Write every session that changed since its last save; return how many.

        Only sessions whose document lock was released since the last flush
        are looked at (their app code may have run), unless ``everyone``:
        a graceful stop and the periodic refresh of TTLs look at all, for
        state changed outside the lock. A session whose write fails stays
        marked as changed for the next flush.
        """
        now = time.monotonic()
        touch = now - self._last_touch > self.ttl_ms / 3000.0
        candidates, self._touched = self._touched, set()
        if everyone or touch:
            candidates.update(self._recorders.values())
        batch: list[tuple[Recorder, dict[str, str]]] = []
        for count, recorder in enumerate(candidates, 1):
            if count % SNAPSHOTS_PER_YIELD == 0:
                # Many sessions changed at once: let their messages in between.
                gevent.sleep(0)
            if recorder.wake is None:
                continue  # forgotten meanwhile
            if everyone:
                # A stop writes every session: Redis may have lost keys
                # (a restart without persistence, an eviction, a failover).
                recorder.dirty = True
            fields = recorder.snapshot()
            if fields is not None:
                batch.append((recorder, fields))
        deletes, self._deletes = self._deletes, []
        if not batch and not deletes and not touch:
            return 0
        try:
            pipe = self._redis().pipeline(transaction=False)
            for key, owner in deletes:
                if owner is None:
                    pipe.delete(key)
                else:
                    pipe.eval(DELETE_SCRIPT, 1, key, owner)
            for recorder, fields in batch:
                pipe.eval(WRITE_SCRIPT, 1, recorder.key, self.owner, "1" if recorder.claim else "0", self.ttl_ms,
                          *(x for pair in fields.items() for x in pair))
            refreshed: list[Recorder] = []
            if touch:
                # Sessions that live on without changes keep their data.
                for recorder in list(self._recorders.values()):
                    if recorder.saved:
                        pipe.pexpire(recorder.key, self.ttl_ms)
                        refreshed.append(recorder)
            results = pipe.execute()
        except BaseException:
            for recorder, _ in batch:
                recorder.dirty = True
                recorder._state_json = None
                self._touched.add(recorder)
            self._deletes.extend(deletes)
            raise
        if touch:
            self._last_touch = now
            if refreshed and isinstance(results, list) and len(results) >= len(refreshed):
                for recorder, result in zip(refreshed, results[len(results) - len(refreshed):]):
                    if result == 0 and recorder.wake is not None:
                        # Redis lost the key (PEXPIRE answers 0): write it again.
                        self.figures["lost_keys"] += 1
                        recorder.dirty = True
                        self._touched.add(recorder)
        written = 0
        for n, (recorder, _) in enumerate(batch, len(deletes)):
            if isinstance(results, list) and n < len(results) and results[n] == 0:
                # Another copy of the session claimed the key: its data stays.
                self.figures["not_owner"] += 1
                recorder.saved = False
                continue
            written += 1
            recorder.saved = True
            recorder.claim = False
            if recorder.overflowed:
                self.figures["too_large"] += 1
        self.figures["saved"] += written
        return written

    def save_all(self, timeout: float = 10.0) -> None:
        """Write every changed session now (a graceful stop), before WebSockets close.

        From then on discarded sessions keep their data. Errors are logged:
        a stop must go on.
        """
        self._stopped = True
        try:
            with gevent.Timeout(timeout):
                count = self.flush(everyone=True)
            if count:
                log.info("Saved %d session(s) for restore before closing their WebSockets", count)
        except BaseException as exc:  # gevent.Timeout is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit, gevent.GreenletExit)):
                raise
            self.figures["save_errors"] += 1
            log.warning("Saving sessions at stop failed (%s: %s); a restore gives what was saved before",
                        type(exc).__name__, exc)

    def stop(self) -> None:
        self._stopped = True
        if self._flusher is not None:
            self._flusher.kill(block=False)
            self._flusher = None
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def restart(self) -> None:
        """After :meth:`stop`, record and flush again (a server started again)."""
        self._stopped = False

    # -- restoring --------------------------------------------------------------

    def restore(
        self,
        context: ApplicationContext,
        session_id: str,
        request: Any,
        token: str,
        payload: dict[str, Any],
    ) -> ServerSession:
        """The session ``session_id`` of a gone worker, rebuilt from what was saved,
        or fresh (with a log line naming why) when it cannot be rebuilt faithfully."""
        existing = context.get_session(session_id)
        if existing is not None:
            return existing
        started = time.perf_counter()
        self.waiting += 1
        try:
            got = self._slots.acquire(timeout=RESTORE_WAIT_SECONDS)
        finally:
            self.waiting -= 1
        if not got:
            self.figures["fresh_because_busy"] += 1
            log.warning("App %s: session %s gets a fresh session: no restore slot within %g s"
                        " (DOCSYNC_RESTORE_CONCURRENCY=%d)", context.url, session_id,
                        RESTORE_WAIT_SECONDS, self.concurrency)
            return self._claim(context.create_session_if_needed(session_id, request, token, payload))
        try:
            saved = self._load(context, session_id, request)
            session = context.create_session_if_needed(session_id, request, token, payload, saved=saved)
            if saved is not None and saved.failure is None:
                self.figures["restored"] += 1
                log.info("App %s: restored session %s of a gone worker (%d changes) in %.0f ms",
                         context.url, session_id, len(saved.changes), (time.perf_counter() - started) * 1000)
            return self._claim(session)
        finally:
            self._slots.release()
            self.restore_seconds += time.perf_counter() - started

    @staticmethod
    def _claim(session: ServerSession) -> ServerSession:
        """``session`` takes the place of a gone worker's: its next flush
        writes it (claiming the key), also when it has nothing to save, so
        that a later restore does not bring back the older data."""
        recorder = session.recorder
        if recorder is not None and recorder.saved is False:
            recorder.claim = True
            recorder.dirty = True
            recorder.touched()
        return session

    def _check_user(self, context: ApplicationContext, session_id: str, fields: dict[str, str], request: Any) -> None:
        """Refuse a reconnect of another user than the one the session was saved for.

        A session saved without a user (authorize off) restores for anyone.

        :raises TokenError: as a live session refuses another user.
        """
        try:
            meta = json.loads(fields.get("meta") or "{}")
        except ValueError:
            return  # damaged: a mismatch, and a fresh session for this user
        owner = meta.get("user") if isinstance(meta, dict) else None
        if owner is None:
            return
        mac = user_mac(self.secret, getattr(request, "user", None))
        if mac is None or not hmac.compare_digest(str(owner), mac):
            self.figures["refused_user"] += 1
            log.warning("App %s: session %s was saved for another user; its restore is refused",
                        context.url, session_id)
            raise TokenError("This session belongs to another user.")

    def _load(self, context: ApplicationContext, session_id: str, request: Any = None) -> Saved | None:
        key = self.key(context.url, session_id)
        try:
            raw = self._redis().hgetall(key)
        except Exception as exc:
            self.figures["fresh_because_error"] += 1
            log.warning("App %s: session %s gets a fresh session: its saved data could not be read (%s: %s)",
                        context.url, session_id, type(exc).__name__, exc)
            return None
        if not raw:
            self.figures["nothing_saved"] += 1
            log.info("App %s: session %s of a gone worker had nothing saved; it starts fresh",
                     context.url, session_id)
            return None
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        # Before anything else: another user must not learn, nor undo, what is saved.
        self._check_user(context, session_id, fields, request)
        try:
            saved = Saved(self, key, fields)
            saved.check_before(context.app_fingerprint)
        except (ValueError, NotFaithful) as exc:
            self.mismatch(context.url, session_id, str(exc))
            return None
        return saved

    def mismatch(self, route: str, session_id: str, reason: str) -> None:
        """Count and log a restore abandoned for ``reason``; its saved data goes.

        The delete is queued ahead of any write of the fresh session that
        takes the id (a flush deletes before it writes).
        """
        self.figures["fresh_because_mismatch"] += 1
        self._deletes.append((self.key(route, session_id), None))
        log.warning("App %s: session %s cannot be restored faithfully (%s); it starts fresh",
                    route, session_id, reason)

    def stats(self) -> dict[str, Any]:
        recorders = list(self._recorders.values())
        return {
            **{k: self.figures[k] for k in (
                "saved", "restored", "nothing_saved", "fresh_because_mismatch", "fresh_because_busy",
                "fresh_because_error", "too_large", "save_errors", "lost_keys", "refused_user", "not_owner")},
            "replayed": self.figures["replayed"],
            "skipped": sum(r.skipped for r in recorders) + self.figures["skipped_gone"],
            "recorded_sessions": len(recorders),
            "recorded_bytes": sum(r.bytes for r in recorders),
            "waiting": self.waiting,
            "restore_seconds": round(self.restore_seconds, 3),
        }
