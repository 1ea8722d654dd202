"""The one place where flask-docsync adapts to Bokeh's releases and reaches
into Bokeh's private document and application API.

Bokeh up to 3.9 keeps the stack behind ``curdoc()`` in a module-global list,
so two sessions' callbacks interleaving on gevent greenlets would see each
other's documents. Bokeh 3.10 keeps it in a ``ContextVar``. :func:`install`
gives 3.9 the same per-greenlet behaviour by swapping the global list for a
stack stored in a ``ContextVar`` (greenlet >= 1.0 gives every greenlet its
own context), leaving 3.10 untouched.

Private names used, each checked on both supported Bokeh releases by
``tests/test_bokeh_seams.py``: ``bokeh.io.doc._PATCHED_CURDOCS``,
``Document._session_context``, ``DocumentModuleManager._modules``, the
``gc`` global of ``bokeh.document.document``, the models' cached
``_unstable_default_values``/``_unstable_themed_values``,
``DocumentCallbackManager._session_callbacks``,
``DirectoryHandler._lifecycle_handler``, the handlers' ``_runner``,
``_main_handler`` and ``_func`` (:func:`handler_source`), and ``LifecycleHandler``'s
``_on_session_created``/``_on_session_destroyed``. The protocol's
``Protocol._messages`` is read by :mod:`flask_docsync.protocol`, and
``bokeh.util.token``'s ``_signature``, ``_get_random_string``,
``_base64_decode``, ``_BytesDecoder`` and ``_TOKEN_ZLIB_KEY`` by
:mod:`flask_docsync.tokens`.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import inspect
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import bokeh
from bokeh.application.handlers.directory import DirectoryHandler
from bokeh.application.handlers.handler import Handler
from bokeh.application.handlers.lifecycle import LifecycleHandler
from bokeh.core.has_props import HasProps
from bokeh.document import document as _bokeh_document
from bokeh.io import doc as _bokeh_io_doc
from bokeh.io import state as _bokeh_io_state

BOKEH_VERSION: tuple[int, ...] = tuple(
    int(part) for part in bokeh.__version__.split(".")[:2] if part.isdigit()
)

#: BokehJS before 3.10 drops the binary buffers of the document it pulls
#: again after a reconnect (``replace_with_json(doc_json)`` without them;
#: bokeh issue 15347): a document with a numpy column then fails to load
#: ("buffer for id=... not found") and the page keeps its stale copy, under
#: ``bokeh serve`` too. :func:`pull_reply` inlines the buffers (base64) for
#: such a pull.
REPULL_DROPS_BUFFERS = BOKEH_VERSION < (3, 10)


def pull_reply(request_id: str, document: Any, inline_buffers: bool) -> Any:
    """A ``PULL-DOC-REPLY`` for ``document``; with ``inline_buffers`` its binary buffers are base64 in the JSON.

    Inlined buffers cost a third more bytes, so only a pull that BokehJS
    may be making again (see :data:`REPULL_DROPS_BUFFERS`) should ask for them.
    """
    from bokeh.protocol.messages.pull_doc_reply import PullDoc, pull_doc_reply

    if not inline_buffers:
        return pull_doc_reply.create(request_id, document)
    return pull_doc_reply(pull_doc_reply.create_header(request_id=request_id), {},
                          PullDoc(doc=document.to_json(deferred=False)))


_stack: contextvars.ContextVar[tuple[weakref.ReferenceType[Any], ...]] = contextvars.ContextVar(
    "flask_docsync_curdoc", default=()
)


class _ContextCurdocStack:
    """A list-like stack whose contents belong to the current greenlet.

    It supports exactly the operations ``bokeh.io.doc`` performs on its
    ``_PATCHED_CURDOCS`` list.
    """

    def append(self, ref: weakref.ReferenceType[Any]) -> None:
        _stack.set(_stack.get() + (ref,))

    def pop(self) -> weakref.ReferenceType[Any]:
        current = _stack.get()
        _stack.set(current[:-1])
        return current[-1]

    def __len__(self) -> int:
        return len(_stack.get())

    def __getitem__(self, index: int) -> weakref.ReferenceType[Any]:
        return _stack.get()[index]

    def __iter__(self) -> Iterator[weakref.ReferenceType[Any]]:
        return iter(_stack.get())

    def __repr__(self) -> str:
        return f"<per-greenlet curdoc stack {list(_stack.get())!r}>"


def install() -> None:
    """Make ``curdoc()`` per greenlet, and let :func:`destroy_document` skip
    Bokeh's full collection. Process-wide; calls after the first do nothing."""
    _install_document_gc()
    current = getattr(_bokeh_io_doc, "_PATCHED_CURDOCS", None)
    if isinstance(current, list):
        _bokeh_io_doc._PATCHED_CURDOCS = _ContextCurdocStack()
        # Entries pushed before (e.g. at import time) stay visible to the
        # greenlet that pushed them.
        _stack.set(_stack.get() + tuple(current))


def save_curdoc() -> Any:
    """This greenlet's curdoc stack, for :func:`restore_curdoc` (``None`` on Bokeh 3.10)."""
    if isinstance(_bokeh_io_doc._PATCHED_CURDOCS, _ContextCurdocStack):
        return _stack.get()
    return None


def restore_curdoc(saved: Any) -> None:
    """Undo what a raising callback left on the curdoc stack (see :func:`curdoc_guard`)."""
    if saved is not None:
        _stack.set(saved)


@contextlib.contextmanager
def curdoc_guard() -> Iterator[None]:
    """Restore this greenlet's curdoc stack on exit.

    Bokeh 3.9's ``patch_curdoc`` pops only when the body returns normally,
    so a callback that raises would leave its document on the stack of a
    long-lived greenlet (a connection's reader, a worker's request loop).
    Bokeh 3.10 restores it itself; there this does nothing.
    """
    if not isinstance(_bokeh_io_doc._PATCHED_CURDOCS, _ContextCurdocStack):
        yield
        return
    saved = _stack.get()
    try:
        yield
    finally:
        _stack.set(saved)


@contextlib.contextmanager
def curdoc_as(doc: Any) -> Iterator[None]:
    """``patch_curdoc(doc)`` that also undoes itself when the body raises.

    The process-wide default document (``curstate().document``, what
    ``curdoc()`` gives outside any patch) is put back as well. Panel's
    script runner saves ``curdoc()`` (here: ``doc``), calls ``set_curdoc``
    and then "restores" that saved value globally, which left every
    session's document referenced from Bokeh's global state until the next
    session replaced it, and made it what unpatched code saw as
    ``curdoc()``.
    """
    state = _bokeh_io_state.curstate()
    default = state._document
    try:
        with curdoc_guard(), _bokeh_io_doc.patch_curdoc(doc):
            yield
    finally:
        if state._document is not default:
            state._document = default


class _DocumentGc:
    """What ``bokeh.document.document`` sees as its ``gc`` module.

    ``Document.destroy`` ends with a full ``gc.collect()``. This stand-in
    forwards everything to the real module, except that ``collect`` does
    nothing inside :func:`destroy_document`, which is marked by a context
    variable: every other greenlet and every OS thread (the offload pool,
    gevent's monitor) that calls Bokeh's ``destroy`` gets the real collection.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(gc, name)

    @staticmethod
    def collect(generation: int = 2) -> int:
        if _destroying.get():
            return 0
        return gc.collect(generation)


_destroying: contextvars.ContextVar[bool] = contextvars.ContextVar("flask_docsync_destroying", default=False)


def _install_document_gc() -> None:
    if not isinstance(getattr(_bokeh_document, "gc", None), _DocumentGc):
        _bokeh_document.gc = _DocumentGc()  # type: ignore[assignment]


def _drop_modules(doc: Any) -> None:
    """What ``DocumentModuleManager.destroy`` does, without its heap scan.

    Bokeh's version calls ``gc.get_referrers`` for every module an app
    script ran in, to log a leak warning; that scans the whole heap (tens
    to hundreds of milliseconds with a large one). Done here first, the
    manager's own ``destroy`` finds no modules left.
    """
    manager = doc.modules
    modules = getattr(manager, "_modules", None)
    if not isinstance(modules, list):
        return
    for module in modules:
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
        module.__dict__.clear()
    manager._modules = []


def model_table(doc: Any) -> dict[str, Any]:
    """The document's ``{id: model}`` dict of live models (Bokeh's private
    ``DocumentModelManager._models``).

    Bokeh builds a new dict whenever it recomputes the set of models, so its
    identity tells :mod:`flask_docsync.restore` when a table of ranks made
    from it is stale, without sorting the models again for every message.
    """
    return doc.models._models  # type: ignore[no-any-return]


def set_session_context(doc: Any, context: Any) -> None:
    """Make ``context`` the document's ``session_context`` (``None`` detaches it).

    Bokeh's server sets the private ``Document._session_context`` to a weak
    reference; ``Document.session_context`` reads it.
    """
    doc._session_context = weakref.ref(context) if context is not None else None


def destroy_document(doc: Any, session: Any) -> None:
    """``Document.destroy(session)`` without its full garbage collection,
    then break the reference cycles it leaves.

    Bokeh runs ``gc.collect()`` for every destroyed document, and
    ``gc.get_referrers()`` for every script module (a diagnostic check);
    both scan the whole heap, which with a large heap costs tens to hundreds
    of milliseconds per session and stalls every other session on the event
    loop. Here the script modules are dropped first (:func:`_drop_modules`),
    the collection is skipped for this call alone (:class:`_DocumentGc`),
    and :func:`_break_cycles` clears what ``destroy`` leaves in reference
    cycles, so reference counting frees the document at once and nothing
    waits for Python's generational collector (which runs a full collection
    rarely once the heap is large).
    """
    # Read before destroy: it deletes the document's model index.
    models = list(doc.models)
    config = getattr(doc, "config", None)
    callbacks = doc.callbacks
    _drop_modules(doc)
    token = _destroying.set(True)
    try:
        doc.destroy(session)
    finally:
        _destroying.reset(token)
    _break_cycles(models, config, callbacks)


def _break_cycles(models: list[Any], config: Any, callbacks: Any) -> None:
    """Clear what keeps a destroyed document's objects in reference cycles.

    ``Document.destroy`` clears each model's property values but leaves:

    - the cached default and themed values of every model (Bokeh creates a
      list, dict or model default on first read and keeps it, and every
      such container points back at its owner model), including those of
      models reachable only through such defaults;
    - the document's ``config`` model, which is not one of its models;
    - the document's session callbacks, whose wrappers close over the
      document.

    The caches are refilled on the next read, so a model that live code
    still holds keeps working as after Bokeh's own ``destroy``; the rest
    belonged to the destroyed document alone. Attributes a Bokeh release
    does not have are skipped, leaving those cycles to the collector.
    """
    if config is not None and hasattr(config, "destroy"):
        config.destroy()
        models.append(config)
    seen: set[int] = set()
    while models:
        model = models.pop()
        if id(model) in seen:
            continue
        seen.add(id(model))
        try:
            with_refs = type(model).properties_with_refs()
        except Exception:
            with_refs = {}
        for name in ("_unstable_default_values", "_unstable_themed_values"):
            cache = getattr(model, name, None)
            if not isinstance(cache, dict):
                continue
            for prop, value in cache.items():
                if prop in with_refs:
                    _models_in(value, models)
            cache.clear()
    session_callbacks = getattr(callbacks, "_session_callbacks", None)
    if isinstance(session_callbacks, set):
        session_callbacks.clear()


def _models_in(value: Any, out: list[Any]) -> None:
    # Only cached defaults of properties that can hold models get here, never
    # values an app set, so this does not walk data columns.
    if isinstance(value, HasProps):
        out.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _models_in(key, out)
            _models_in(item, out)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _models_in(item, out)


def session_hook(handler: Any, name: str) -> Any:
    """The callable behind ``handler.<name>`` (a session lifecycle hook).

    For the hooks of ``server_lifecycle.py``/``app_hooks.py`` this is the
    user's own function: Bokeh 3.9 returns an ``async def`` hook's
    coroutine without awaiting it, and Bokeh 3.10 runs the hook in a
    thread (``asyncio.to_thread``), which under gevent leaves the session's
    greenlet and its context. Calling the function directly, and awaiting
    what it returns, gives both releases the same behaviour. Other handlers
    keep their method, unless it is the base class's empty one.
    """
    if isinstance(handler, DirectoryHandler):
        # An app directory's hooks live in its server_lifecycle.py/app_hooks.py handler.
        handler = getattr(handler, "_lifecycle_handler", handler)
    if isinstance(handler, LifecycleHandler):
        fn = getattr(handler, "_" + name, None)
        if callable(fn):
            return fn
    if getattr(type(handler), name, None) is getattr(Handler, name, _missing):
        # The base class's hook is an ``async def`` that does nothing; calling
        # it would still cost a turn of the asyncio loop, for every session
        # created and for every session discarded.
        return _no_session_hook
    return getattr(handler, name)


_missing = object()


def _no_session_hook(session_context: Any) -> None:
    return None


def handler_source(handler: Any) -> bytes:
    """The source of what a Bokeh handler runs (its script, or its function), for a fingerprint; ``b""`` if unknown."""
    runner = getattr(handler, "_runner", None)
    source = getattr(runner, "source", None)
    if isinstance(source, str):
        return source.encode()
    main = getattr(handler, "_main_handler", None)
    if main is not None and main is not handler:
        return handler_source(main)
    func = getattr(handler, "_func", None)
    if func is not None:
        try:
            return inspect.getsource(func).encode()
        except (OSError, TypeError):
            code = getattr(func, "__code__", None)
            return code.co_code if code is not None else repr(func).encode()
    return b""
