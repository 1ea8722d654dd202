"""The private Bokeh API flask-docsync relies on, checked on the installed Bokeh.

The suite runs on both supported Bokeh releases (3.9 and 3.10), so a release
that renames or reshapes one of these fails here, by name, rather than as a
leak or a slow discard somewhere else.
"""

from __future__ import annotations

import gc
import sys
import threading

import pytest
from bokeh.application.handlers.directory import DirectoryHandler
from bokeh.application.handlers.lifecycle import LifecycleHandler
from bokeh.document import Document
from bokeh.document import document as bokeh_document
from bokeh.io import curdoc
from bokeh.io import doc as bokeh_io_doc
from bokeh.models import ColumnDataSource, Div
from bokeh.protocol import Protocol

from flask_docsync import compat
from flask_docsync.context import ApplicationContext, RequestData

from conftest import APPS


def test_curdoc_stack_is_a_list_or_per_greenlet_already():
    compat.install()
    stack = bokeh_io_doc._PATCHED_CURDOCS
    if compat.BOKEH_VERSION < (3, 10):
        assert isinstance(stack, compat._ContextCurdocStack), "install() did not replace the 3.9 list"
    else:
        assert not isinstance(stack, list)
    doc = Document()
    with compat.curdoc_as(doc):
        assert curdoc() is doc


def test_session_context_is_read_through_the_private_attribute():
    doc = Document()

    class Context:
        pass

    context = Context()
    compat.set_session_context(doc, context)
    assert doc.session_context is context
    compat.set_session_context(doc, None)
    assert doc.session_context is None


def test_the_model_table_is_replaced_when_the_models_change_and_ids_count_up():
    # flask_docsync.restore caches ranks per model table (by identity) and
    # takes the numeric order of Bokeh's simple ids for creation order.
    doc = Document()
    first = Div(text="a")
    doc.add_root(first)
    table = compat.model_table(doc)
    assert isinstance(table, dict) and table == {first.id: first}
    first.text = "b"  # a plain property: the same set of models
    assert compat.model_table(doc) is table
    second = Div(text="c")
    doc.add_root(second)
    assert compat.model_table(doc) is not table and set(compat.model_table(doc)) == {first.id, second.id}
    assert first.id.startswith("p") and int(second.id[1:]) > int(first.id[1:])


def test_document_destroy_has_the_gc_global_and_the_module_list():
    compat.install()
    assert isinstance(bokeh_document.gc, compat._DocumentGc)
    assert isinstance(Document().modules._modules, list)


def test_model_default_caches_and_session_callbacks_exist():
    source = ColumnDataSource()
    source.data  # a container default, cached on first read
    assert isinstance(source._unstable_default_values, dict) and source._unstable_default_values
    assert isinstance(source._unstable_themed_values, dict)
    doc = Document()
    doc.add_next_tick_callback(lambda: None)
    assert isinstance(doc.callbacks._session_callbacks, set) and len(doc.callbacks._session_callbacks) == 1


def test_lifecycle_handlers_keep_the_users_hooks():
    handler = DirectoryHandler(filename=str(APPS / "hooksapp"))
    lifecycle = handler._lifecycle_handler
    assert isinstance(lifecycle, LifecycleHandler)
    for name in ("on_session_created", "on_session_destroyed"):
        assert callable(getattr(lifecycle, "_" + name))
        assert compat.session_hook(handler, name) is getattr(lifecycle, "_" + name)


def test_protocol_message_registry():
    assert "PATCH-DOC" in Protocol()._messages and "PULL-DOC-REQ" in Protocol()._messages


def _app_context(script: str) -> ApplicationContext:
    from flask_docsync.apps import build_application

    return ApplicationContext(build_application(script), "/x")


def test_destroy_drops_the_script_module_and_never_scans_the_heap(monkeypatch, tmp_path):
    script = tmp_path / "app.py"
    script.write_text("from bokeh.io import curdoc\nfrom bokeh.models import Div\ncurdoc().add_root(Div())\n")
    context = _app_context(str(script))
    session = context.create_session_if_needed("s1", RequestData(), "t", {})
    [module] = session.document.modules._modules
    name = module.__name__
    assert sys.modules.get(name) is module
    calls = []
    monkeypatch.setattr(gc, "get_referrers", lambda *objs: calls.append(objs) or [])
    collections = []
    gc.callbacks.append(lambda phase, info: collections.append(info["generation"]) if phase == "start" else None)
    try:
        context.discard_session(session)
    finally:
        gc.callbacks.pop()
    assert name not in sys.modules and not module.__dict__
    assert calls == [], "Bokeh's heap scan ran"
    assert 2 not in collections, "a full collection ran inside the discard"


def test_the_skipped_collection_is_invisible_to_other_threads():
    seen = []

    def other_thread():
        before = gc.get_count()
        seen.append(bokeh_document.gc.collect())
        seen.append(before)

    token = compat._destroying.set(True)
    try:
        assert bokeh_document.gc.collect() == 0  # skipped here
        thread = threading.Thread(target=other_thread)
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle the real collection finds
        del garbage
        thread.start()
        thread.join()
    finally:
        compat._destroying.reset(token)
    assert seen[0] >= 1, "the other thread's collect() was skipped too"
    assert bokeh_document.gc.get_referrers is gc.get_referrers


def test_no_os_thread_sees_a_swapped_gc_module_during_a_discard(monkeypatch, tmp_path):
    script = tmp_path / "app.py"
    script.write_text("from bokeh.io import curdoc\nfrom bokeh.models import Div\ncurdoc().add_root(Div())\n")
    context = _app_context(str(script))
    session = context.create_session_if_needed("s2", RequestData(), "t", {})
    real_get_referrers, real_collect = gc.get_referrers, gc.collect
    seen = []
    destroy = Div.destroy

    def destroy_and_look(self):
        # Runs inside Document.destroy; a real thread reads the gc module.
        thread = threading.Thread(target=lambda: seen.append(
            (gc.get_referrers is real_get_referrers, gc.collect is real_collect)))
        thread.start()
        thread.join()
        destroy(self)

    monkeypatch.setattr(Div, "destroy", destroy_and_look)
    context.discard_session(session)
    assert seen == [(True, True)]


def test_session_ids_are_signed_as_bokeh_checks_them():
    # tokens.py signs ids that carry an owner tag with Bokeh's private
    # _signature and _get_random_string; Bokeh's public check must accept them.
    from bokeh.util.token import _get_random_string, _signature, check_session_id_signature

    secret = b"k" * 32
    base = f"{_get_random_string(secret_key=secret)}-tag1"
    assert check_session_id_signature(f"{base}.{_signature(base, secret)}", secret_key=secret, signed=True)
