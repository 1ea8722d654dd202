"""Fast tests of session restore (flask_docsync.restore) in one process.

A session of tests/apps/restore_app.py gets PATCH-DOCs as a browser sends them;
its recorder's data goes to a dict standing for Redis; a second application
context (another worker, as far as ids go: the model counter has moved on)
rebuilds the session from it.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest
from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.util.token import generate_jwt_token

from conftest import APPS

sys.path.insert(0, str(APPS))
import restore_app  # noqa: E402  (tests/apps)
from flask_docsync.context import ApplicationContext, RequestData
from flask_docsync.protocol import protocol
from flask_docsync import restore as restore_module
from flask_docsync.restore import Restorer, replay, skeleton


class FakeRedis:
    """The few hash commands the restorer uses, over a dict shared by "workers"."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.ttl: dict[str, int] = {}
        self.ops: list = []
        self.results: list = []

    def pipeline(self, transaction=False):
        return self

    def hset(self, key, mapping):
        self.ops.append(("hset", key))
        self.data.setdefault(key, {}).update({k.encode(): v.encode() for k, v in mapping.items()})
        self.results.append(len(mapping))

    def pexpire(self, key, ms):
        self.ttl[key] = ms
        self.results.append(int(key in self.data))

    def delete(self, key):
        self.ops.append(("delete", key))
        self.results.append(int(self.data.pop(key, None) is not None))

    def eval(self, script, numkeys, key, owner, *args):
        # The two scripts of flask_docsync.restore, as Redis runs them.
        current = self.data.get(key, {}).get(b"owner")
        mine = current is None or current == owner.encode()
        if script == restore_module.DELETE_SCRIPT:
            self.ops.append(("delete", key))
            self.results.append(int(current is not None and mine and self.data.pop(key, None) is not None))
            return
        assert script == restore_module.WRITE_SCRIPT
        claim, ms, fields = args[0], args[1], args[2:]
        if not mine and claim != "1":
            self.results.append(0)
            return
        self.ops.append(("hset", key))
        self.data[key] = {b"owner": owner.encode(), **{k.encode(): v.encode() for k, v in zip(fields[::2], fields[1::2])}}
        self.ttl[key] = ms
        self.results.append(1)

    def hgetall(self, key):
        return dict(self.data.get(key, {}))

    def execute(self):
        results, self.results = self.results, []
        return results

    def close(self):
        pass


_workers: list = []


@pytest.fixture
def redis_data():
    yield {}
    while _workers:
        restorer, context = _workers.pop()
        context.destroy_all(force=True)
        restorer.stop()


def make_worker(redis_data, app=restore_app.full_app, **kw):
    restorer = Restorer("redis://unused", flush_ms=10_000, client_factory=lambda url, timeout: FakeRedis(redis_data),
                        **kw)
    context = ApplicationContext(Application(FunctionHandler(app)), "/r")
    context.restorer = restorer
    _workers.append((restorer, context))
    return restorer, context


def new_session(context, session_id="sess1"):
    token = generate_jwt_token(session_id, signed=False, secret_key=None)
    return context.create_session_if_needed(session_id, RequestData(), token, {})


class Browser:
    def send_frames(self, frames):
        pass


def patch(session, *events, buffers=()):
    msg = protocol.assemble(json.dumps({"msgid": "m", "msgtype": "PATCH-DOC", "num_buffers": len(buffers)}), "{}",
                            json.dumps({"events": list(events)}))
    for header, payload in buffers:
        msg.assemble_buffer(header, payload)
    session.handle_patch(msg, Browser())


def changed(model, attr, new):
    return {"kind": "ModelChanged", "model": {"id": model.id}, "attr": attr, "new": new}


def click(button):
    return {"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
        "type": "event", "name": "button_click", "values": {"type": "map", "entries": [
            ["model", {"id": button.id}]]}}}


def one(doc, name):
    return doc.select_one({"name": name})


def use_the_app(session):
    """What a user does: select, zoom the new figure, slide, edit a cell, click twice."""
    doc = session.document
    patch(session, changed(one(doc, "select"), "value", "scatter"))
    plot = one(doc, "plot")
    assert plot.title.text == "scatter"
    patch(session, changed(plot.x_range, "start", 2.5), changed(plot.x_range, "end", 7.25))
    patch(session, changed(one(doc, "slider"), "value", 10))
    patch(session, changed(one(doc, "slider"), "value", 42))
    # As BokehJS's DataTable editor sends it (source.patch of a Map).
    patch(session, {"kind": "ColumnsPatched", "model": {"id": one(doc, "source").id}, "attr": "data",
                    "patches": {"type": "map", "entries": [["score", [[1, 98]]]]}})
    patch(session, {"kind": "ColumnsPatched", "model": {"id": one(doc, "source").id}, "attr": "data",
                    "patches": {"type": "map", "entries": [["score", [[1, 99]]]]}})
    patch(session, click(one(doc, "button")))
    patch(session, click(one(doc, "button")))


def restore_on(context, restorer, session_id="sess1"):
    token = generate_jwt_token(session_id, signed=False, secret_key=None)
    return restorer.restore(context, session_id, RequestData(), token, {})


def test_a_session_comes_back_on_another_worker_with_what_the_user_set(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    use_the_app(session)
    assert restorer.flush() == 1
    before = skeleton(session.document)

    restorer2, context2 = make_worker(redis_data)
    restored = restore_on(context2, restorer2)
    doc = restored.document
    assert restored is not session and restored.id == session.id
    assert one(doc, "slider").value == 42
    assert one(doc, "derived").text == "double: 84", "the slider's callback ran again"
    assert one(doc, "select").value == "scatter"
    plot = one(doc, "plot")
    assert plot.title.text == "scatter", "the select's callback rebuilt the figure"
    assert (plot.x_range.start, plot.x_range.end) == (2.5, 7.25), "the zoom lands on the rebuilt figure"
    assert one(doc, "source").data["score"] == [1, 99, 3]
    assert len([k for k in session.recorder.entries if k[1] == "cell"]) == 1, "the latest edit of a cell replaces the earlier"
    assert one(doc, "clicks").text == "clicks: 2", "the app's declared state came back"
    assert skeleton(doc) == before
    assert one(doc, "slider").id != one(session.document, "slider").id, "new ids: another worker's"
    assert restorer2.figures["restored"] == 1 and restorer2.figures["fresh_because_mismatch"] == 0
    # The replay was recorded again: a second death restores as well.
    assert restored.recorder.saved and restorer2.flush() == 1
    restorer3, context3 = make_worker(redis_data)
    again = restore_on(context3, restorer3)
    assert one(again.document, "derived").text == "double: 84"
    assert (one(again.document, "plot").x_range.start, one(again.document, "clicks").text) == (2.5, "clicks: 2")


def test_latest_value_wins_and_the_log_stays_small(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    slider = one(session.document, "slider")
    for value in range(1000):
        patch(session, changed(slider, "value", value))
    assert len(session.recorder.entries) == 1
    restorer.flush()
    saved = redis_data[session.recorder.key]
    assert len(saved[b"changes"]) < 100


def test_nothing_saved_gives_a_fresh_session(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        session = restore_on(context, restorer, "never-seen")
    assert one(session.document, "slider").value == 1
    assert restorer.figures["nothing_saved"] == 1
    assert "had nothing saved" in caplog.text


def _other_app(doc):
    from bokeh.models import Slider

    doc.add_root(Slider(start=0, end=100, value=1, name="slider"))


def test_a_changed_script_gives_a_fresh_session_with_a_log_line(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, app=_other_app)
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        fresh = restore_on(context2, restorer2)
    assert one(fresh.document, "slider").value == 1
    assert restorer2.figures["fresh_because_mismatch"] == 1 and restorer2.figures["restored"] == 0
    assert "source changed" in caplog.text
    restorer2.flush()
    saved = redis_data[session.recorder.key]
    assert saved[b"owner"] == restorer2.owner.encode() and saved[b"changes"] == b"[]", (
        "the data that cannot be restored is replaced by the fresh session's")


#: How many sliders structure_app makes; tests change it between "workers".
SLIDERS = [1]


def structure_app(doc):
    from bokeh.models import Div, Slider

    state = restorable_state()
    for n in range(SLIDERS[0]):
        doc.add_root(Slider(start=0, end=100, value=1, name=f"s{n}"))
    doc.add_root(Div(text=f"note: {state['note']}", name="note"))


def restorable_state():
    from flask_docsync import restorable

    return restorable(note="")


def test_another_structure_gives_a_fresh_session_not_a_half_restored_one(redis_data, caplog):
    SLIDERS[0] = 1
    restorer, context = make_worker(redis_data, app=structure_app)
    session = new_session(context)
    patch(session, changed(one(session.document, "s0"), "value", 42))
    session.document.session_context._docsync_state["note"] = "kept"
    restorer.flush()
    SLIDERS[0] = 2  # the app's structure depends on something that changed
    try:
        restorer2, context2 = make_worker(redis_data, app=structure_app)
        with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
            fresh = restore_on(context2, restorer2)
    finally:
        SLIDERS[0] = 1
    assert one(fresh.document, "s0").value == 1
    assert one(fresh.document, "note").text == "note: ", "no restored state in a fresh session"
    assert restorer2.figures["fresh_because_mismatch"] == 1
    assert "another document" in caplog.text
    assert len(context2.sessions) == 1 and context2.sessions[0] is fresh


def test_the_app_state_alone_is_restored(redis_data):
    restorer, context = make_worker(redis_data, app=structure_app)
    session = new_session(context)
    session.document.session_context._docsync_state["note"] = "hello"
    assert restorer.flush() == 1
    assert restorer.flush() == 0, "unchanged state is not written again"
    restorer2, context2 = make_worker(redis_data, app=structure_app)
    assert one(restore_on(context2, restorer2).document, "note").text == "note: hello"


# -- what cannot be restored: each listed limit ---------------------------------


def test_clicks_are_not_replayed_and_are_logged_once(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        patch(session, click(one(session.document, "button")))
        patch(session, click(one(session.document, "button")))
    assert caplog.text.count("UI events (button_click) cannot be restored") == 1
    assert session.recorder.skipped == 2 and not session.recorder.entries


def test_document_ready_is_dropped_silently(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        patch(session, {"kind": "MessageSent", "msg_type": "bokeh_event",
                        "msg_data": {"type": "event", "name": "document_ready", "values": {"type": "map"}}})
    assert session.recorder.skipped == 0 and "cannot be restored" not in caplog.text


def test_binary_buffers_are_not_saved(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    source = one(session.document, "source")
    value = {"type": "map", "entries": [["name", ["x"]], ["score", {
        "type": "ndarray", "array": {"type": "bytes", "data": {"id": "buf1"}}, "shape": [1], "dtype": "float64",
        "order": "little"}]]}
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        patch(session, changed(source, "data", value), buffers=[({"id": "buf1"}, b"\0" * 8)])
    assert "binary buffer" in caplog.text and not session.recorder.entries


def test_models_the_browser_creates_are_not_saved(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    layout = one(session.document, "layout")
    children = [{"id": c.id} for c in layout.children] + [
        {"type": "object", "name": "Div", "id": "c9999", "attributes": {"text": "from the browser"}}]
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        patch(session, changed(layout, "children", children))
    assert "a model the browser created" in caplog.text and not session.recorder.entries


def test_streams_from_the_browser_are_not_saved(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        patch(session, {"kind": "ColumnsStreamed", "model": {"id": one(session.document, "source").id},
                        "attr": "data", "data": {"name": ["d"], "score": [4]}, "rollover": None})
    assert "ColumnsStreamed from the browser" in caplog.text and not session.recorder.entries


def test_past_the_byte_cap_a_session_restores_fresh(redis_data, caplog):
    restorer, context = make_worker(redis_data, max_bytes=2048)
    session = new_session(context)
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        patch(session, changed(one(session.document, "slider"), "title", "x" * 4000))
    assert "DOCSYNC_RESTORE_MAX_BYTES" in caplog.text
    patch(session, changed(one(session.document, "slider"), "value", 7))  # not recorded any more
    restorer.flush()
    assert restorer.figures["too_large"] == 1
    restorer2, context2 = make_worker(redis_data, max_bytes=2048)
    fresh = restore_on(context2, restorer2)
    assert one(fresh.document, "slider").value == 1 and restorer2.figures["fresh_because_mismatch"] == 1


def test_a_discarded_session_deletes_its_data(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 5))
    restorer.flush()
    key = session.recorder.key
    assert key in redis_data
    assert context.discard_session(session)
    restorer.flush()
    assert key not in redis_data


def test_at_a_graceful_stop_discarded_sessions_keep_their_data(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 5))
    key = session.recorder.key
    restorer.save_all()
    context.destroy_all(force=True)
    restorer.flush()
    assert key in redis_data


def test_a_cell_edit_after_a_new_data_set_is_replayed_on_the_new_data(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    source = one(session.document, "source")
    patch(session, {"kind": "ColumnsPatched", "model": {"id": source.id}, "attr": "data",
                    "patches": {"score": [[0, 50]]}})
    patch(session, changed(source, "data", {"name": ["p", "q"], "score": [7, 8]}))
    patch(session, {"kind": "ColumnsPatched", "model": {"id": source.id}, "attr": "data",
                    "patches": {"score": [[1, 80]]}})
    assert [k[1] for k in session.recorder.entries] == ["set", "cell"]
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    assert one(restore_on(context2, restorer2).document, "source").data == {"name": ["p", "q"], "score": [7, 80]}


def test_replay_refuses_a_rank_that_does_not_exist(redis_data):
    from flask_docsync.restore import NotFaithful

    restorer, context = make_worker(redis_data)
    session = new_session(context)
    with pytest.raises(NotFaithful):
        replay(session, [[["set", 10_000, "value"], 1, 5]])


# -- settings, the per-app switch, the concurrency limit ----------------------------

SECRET = "unit-secret-" + "u" * 32


def test_restore_without_redis_is_refused_naming_both_keys():
    from flask_docsync.config import Settings
    from flask_docsync.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as info:
        Settings.load({"DOCSYNC_RESTORE_SESSIONS": "true", "DOCSYNC_SECRET_KEY": SECRET}, {})
    assert "DOCSYNC_RESTORE_SESSIONS" in str(info.value) and "DOCSYNC_REDIS_URL" in str(info.value)
    with pytest.raises(ConfigurationError, match="DOCSYNC_RESTORE_FLUSH_MS"):
        Settings.load({"DOCSYNC_RESTORE_FLUSH_MS": 0}, {})
    with pytest.raises(ConfigurationError, match="DOCSYNC_RESTORE_CONCURRENCY"):
        Settings.load({"DOCSYNC_RESTORE_CONCURRENCY": "many"}, {})
    with pytest.raises(ConfigurationError, match="signed"):
        Settings.load({"DOCSYNC_RESTORE_SESSIONS": True, "DOCSYNC_REDIS_URL": "redis://localhost:1/0",
                       "DOCSYNC_SIGN_SESSIONS": False}, {})


def test_add_app_restore_overrides_the_setting():
    from flask_docsync.config import Settings
    from flask_docsync.errors import ConfigurationError
    from flask_docsync.server import DocSyncServer

    plain = DocSyncServer(Settings.load({"DOCSYNC_SECRET_KEY": SECRET}, {}))
    with pytest.raises(ConfigurationError) as info:
        plain.add_app("/x", restore_app.full_app, restore=True)
    assert "DOCSYNC_REDIS_URL" in str(info.value) and "restore=True" in str(info.value)

    settings = Settings.load({"DOCSYNC_SECRET_KEY": SECRET, "DOCSYNC_REDIS_URL": "redis://localhost:1/0",
                              "DOCSYNC_RESTORE_SESSIONS": True}, {})
    server = DocSyncServer(settings)
    assert server.add_app("/on", restore_app.full_app).restorer is server.restorer is not None
    assert server.add_app("/off", restore_app.full_app, restore=False).restorer is None
    off = DocSyncServer(Settings.load({"DOCSYNC_SECRET_KEY": SECRET, "DOCSYNC_REDIS_URL": "redis://localhost:1/0"}, {}))
    assert off.add_app("/default", restore_app.full_app).restorer is None
    assert off.add_app("/opted", restore_app.full_app, restore=True).restorer is off.restorer
    # TTL: the unused lifetime, a cleanup pass, and the browser's reconnect window.
    assert server.restorer.ttl_ms == settings.unused_session_lifetime_ms + settings.check_unused_sessions_ms + 60_000


def test_restores_wait_for_a_slot_and_give_up_with_a_fresh_session(redis_data, caplog, monkeypatch):
    import gevent

    from flask_docsync import restore as restore_module

    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, concurrency=1)
    monkeypatch.setattr(restore_module, "RESTORE_WAIT_SECONDS", 0.2)
    assert restorer2._slots.acquire(blocking=False)  # a long restore holds the only slot
    waiter = gevent.spawn(restore_on, context2, restorer2)
    gevent.sleep(0.05)
    assert restorer2.stats()["waiting"] == 1
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        fresh = waiter.get(timeout=5)
    assert one(fresh.document, "slider").value == 1
    assert restorer2.figures["fresh_because_busy"] == 1 and "no restore slot" in caplog.text
    restorer2._slots.release()


def test_a_restore_waits_its_turn_and_then_restores(redis_data):
    import gevent

    restorer, context = make_worker(redis_data)
    for n in range(3):
        session = new_session(context, f"s{n}")
        patch(session, changed(one(session.document, "slider"), "value", 10 + n))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, concurrency=1)
    greenlets = [gevent.spawn(restore_on, context2, restorer2, f"s{n}") for n in range(3)]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [one(g.value.document, "slider").value for g in greenlets] == [10, 11, 12]
    assert restorer2.figures["restored"] == 3


def test_serve_flags_set_the_restore_settings(monkeypatch, tmp_path):
    from flask_docsync.cli import build_parser, create_app

    monkeypatch.setenv("BOKEH_SECRET_KEY", SECRET)
    script = tmp_path / "app.py"
    script.write_text("from bokeh.io import curdoc\nfrom bokeh.models import Div\ncurdoc().add_root(Div())\n")
    options = build_parser().parse_args([
        "serve", str(script), "--session-ids", "signed", "--redis-url", "redis://localhost:1/0",
        "--restore-sessions", "--restore-flush", "150", "--restore-concurrency", "3", "--restore-max-bytes", "4096"])
    app = create_app(options, port=5006)
    settings = app.extensions["docsync"].settings
    assert (settings.restore_sessions, settings.restore_flush_ms, settings.restore_concurrency,
            settings.restore_max_bytes) == (True, 150, 3, 4096)
    assert app.extensions["docsync"].get_context("/app").restorer is not None
    assert build_parser().parse_args(["serve"]).restore_sessions is None


def test_a_patch_with_slices_is_kept_whole(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    source = one(session.document, "source")
    patch(session, {"kind": "ColumnsPatched", "model": {"id": source.id}, "attr": "data", "patches": {
        "type": "map", "entries": [["score", [[{"type": "slice", "start": 0, "stop": 2, "step": None}, [5, 6]]]]]}})
    assert [k[1] for k in session.recorder.entries] == ["patch"]
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    assert one(restore_on(context2, restorer2).document, "source").data["score"] == [5, 6, 3]


def test_a_malformed_event_is_skipped_by_the_recorder_and_refused_by_bokeh(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    with pytest.raises(Exception):
        patch(session, {"kind": "ModelChanged", "model": "not-a-ref", "attr": ["x"], "new": 1})
    assert not session.recorder.entries and session.recorder.skipped == 1


def test_the_title_the_browser_set_comes_back(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, {"kind": "TitleChanged", "title": "mine"})
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    assert restore_on(context2, restorer2).document.title == "mine"


# -- with a real redis-server: Redis going away and coming back ------------------------

from redis_util import redis_server  # noqa: E402,F401  (fixture)


def _real_worker(url, **kw):
    import redis

    restorer = Restorer(url, flush_ms=10_000, client_factory=lambda u, t: redis.Redis.from_url(u, socket_timeout=t,
                        socket_connect_timeout=1), **kw)
    context = ApplicationContext(Application(FunctionHandler(restore_app.full_app)), "/r")
    context.restorer = restorer
    _workers.append((restorer, context))
    return restorer, context


def test_saves_wait_while_redis_is_down_and_a_restore_then_starts_fresh(redis_data, redis_server, caplog):  # noqa: F811
    restorer, context = _real_worker(redis_server.url)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    redis_server.stop()
    with pytest.raises(Exception):
        restorer.flush()
    assert session.recorder.dirty, "what could not be written is written at the next flush"
    restorer2, context2 = _real_worker(redis_server.url)
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        fresh = restore_on(context2, restorer2, "other")
    assert one(fresh.document, "slider").value == 1 and restorer2.figures["fresh_because_error"] == 1
    assert "could not be read" in caplog.text
    redis_server.start()
    assert restorer.flush() == 1
    ttl = redis_server.client().pttl(session.recorder.key)
    assert 0 < ttl <= restorer.ttl_ms
    restorer3, context3 = _real_worker(redis_server.url)
    assert one(restore_on(context3, restorer3).document, "derived").text == "double: 84"


def test_a_server_with_restore_refuses_to_start_without_monkey_patching():
    import gevent.monkey

    from flask_docsync.config import Settings
    from flask_docsync.errors import ConfigurationError
    from flask_docsync.server import DocSyncServer

    if gevent.monkey.is_module_patched("socket"):
        pytest.skip("this process is monkey-patched")
    server = DocSyncServer(Settings.load({"DOCSYNC_SECRET_KEY": SECRET, "DOCSYNC_REDIS_URL": "redis://localhost:1/0",
                                          "DOCSYNC_RESTORE_SESSIONS": True}, {}))
    server.add_app("/r", restore_app.full_app)
    with pytest.raises(ConfigurationError, match="monkey-patching"):
        server.start()
    assert not server._started


def _restoring_app(doc):
    from bokeh.models import Div, Slider

    from flask_docsync import restoring

    seen = Div(text=f"built restoring={restoring()}", name="seen")
    slider = Slider(start=0, end=10, value=1, name="slider")

    def on_value(attr, old, new):
        seen.text += f"; set restoring={restoring()}"

    slider.on_change("value", on_value)
    doc.add_root(slider)
    doc.add_root(seen)


def test_restoring_is_true_while_rebuilding_only(redis_data):
    restorer, context = make_worker(redis_data, app=_restoring_app)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 3))
    assert one(session.document, "seen").text == "built restoring=False; set restoring=False"
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, app=_restoring_app)
    restored = restore_on(context2, restorer2)
    assert one(restored.document, "seen").text == "built restoring=True; set restoring=True"
    patch(restored, changed(one(restored.document, "slider"), "value", 4))
    assert one(restored.document, "seen").text.endswith("; set restoring=False")


def test_a_flush_looks_at_sessions_whose_app_code_ran_and_a_stop_at_all(redis_data):
    restorer, context = make_worker(redis_data, app=structure_app)
    session = new_session(context)
    state = session.document.session_context._docsync_state
    assert restorer.flush() == 1  # the state declared when the app ran
    state["note"] = "outside the lock"  # e.g. from an offload() thread
    assert restorer.flush() == 0, "nothing of this session ran under its lock"
    restorer.save_all()
    assert json.loads(redis_data[session.recorder.key][b"state"]) == {"note": "outside the lock"}
    restorer.restart()
    session.with_document_locked(lambda: state.update(note="in a callback"))
    assert restorer.flush() == 1
    assert json.loads(redis_data[session.recorder.key][b"state"]) == {"note": "in a callback"}


def test_the_server_stats_and_the_stats_log_show_restore(caplog):
    from flask_docsync.config import Settings
    from flask_docsync.server import DocSyncServer

    server = DocSyncServer(Settings.load({"DOCSYNC_SECRET_KEY": SECRET, "DOCSYNC_REDIS_URL": "redis://localhost:1/0",
                                          "DOCSYNC_RESTORE_SESSIONS": True}, {}))
    server.add_app("/r", restore_app.full_app)
    figures = server.stats()["restore"]
    assert {"saved", "restored", "fresh_because_mismatch", "fresh_because_busy", "fresh_because_error",
            "nothing_saved", "too_large", "skipped", "save_errors", "replayed", "waiting",
            "restore_seconds"} <= set(figures)
    server.restorer.figures["restored"] = 3
    with caplog.at_level(logging.DEBUG, "flask_docsync.stats"):
        server._log_stats()
    assert "3 restored" in caplog.text


def test_a_skip_is_logged_at_info_for_the_apps_first_session_only(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    with caplog.at_level(logging.DEBUG, "flask_docsync.restore"):
        for n in range(3):
            session = new_session(context, f"s{n}")
            patch(session, click(one(session.document, "button")))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert [level for level, _ in lines] == ["INFO", "DEBUG", "DEBUG"], lines
    assert restorer.stats()["skipped"] == 3


def _built_later_app(doc):
    from bokeh.models import Slider

    def build():
        doc.add_root(Slider(start=0, end=10, value=1, name="slider"))

    doc.add_next_tick_callback(build)


def test_an_app_that_builds_its_document_in_a_next_tick_callback_restores_fresh(redis_data, caplog):
    import gevent

    restorer, context = make_worker(redis_data, app=_built_later_app)
    session = new_session(context)
    gevent.sleep(0.05)  # the next-tick callback builds the document
    patch(session, changed(one(session.document, "slider"), "value", 7))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, app=_built_later_app)
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        fresh = restore_on(context2, restorer2)
    gevent.sleep(0.05)
    assert one(fresh.document, "slider").value == 1
    assert restorer2.figures["fresh_because_mismatch"] == 1 and "cannot be restored faithfully" in caplog.text


def test_what_the_server_changed_by_itself_and_the_last_interval_do_not_come_back(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    # A periodic callback, say: not an answer to the browser.
    session.with_document_locked(lambda: setattr(one(session.document, "derived"), "text", "by the server"))
    restorer.flush()
    patch(session, changed(one(session.document, "select"), "value", "scatter"))  # after the last flush
    # ... kill -9 here: no flush.
    restorer2, context2 = make_worker(redis_data)
    doc = restore_on(context2, restorer2).document
    assert one(doc, "slider").value == 42
    assert one(doc, "derived").text == "double: 84", "derived again by the replayed slider, not the server's own text"
    assert one(doc, "select").value == "line", "the change after the last flush is lost"


def test_roots_the_browser_removes_are_not_saved_and_the_restore_is_fresh(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    with caplog.at_level(logging.INFO, "flask_docsync.restore"):
        patch(session, {"kind": "RootRemoved", "model": {"id": one(session.document, "layout").id}})
    assert "RootRemoved from the browser" in caplog.text
    patch(session, {"kind": "TitleChanged", "title": "t"})  # something saved, with the new skeleton
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    fresh = restore_on(context2, restorer2)
    assert one(fresh.document, "layout") is not None and restorer2.figures["fresh_because_mismatch"] == 1


def test_a_structure_the_server_changes_by_itself_restores_fresh(redis_data):
    from bokeh.models import Div

    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    # A periodic callback adding a model, say.
    session.with_document_locked(lambda: one(session.document, "layout").children.append(Div(text="new")))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    fresh = restore_on(context2, restorer2)
    assert one(fresh.document, "slider").value == 1 and restorer2.figures["fresh_because_mismatch"] == 1


def test_a_pushed_document_is_not_recorded_and_restores_fresh(redis_data):
    from bokeh.document import Document
    from bokeh.models import Div

    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    pushed = Document()
    pushed.add_root(Div(text="pushed"))
    session.handle_push(protocol.create("PUSH-DOC", pushed), Browser())
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    fresh = restore_on(context2, restorer2)
    assert one(fresh.document, "slider").value == 1 and restorer2.figures["fresh_because_mismatch"] == 1


def test_on_session_created_runs_again_for_a_restored_session(redis_data):
    from bokeh.application.handlers.lifecycle import LifecycleHandler

    created = []

    def make(restorer_data):
        restorer = Restorer("redis://unused", flush_ms=10_000,
                            client_factory=lambda url, timeout: FakeRedis(restorer_data))
        hooks = LifecycleHandler()
        hooks._on_session_created = lambda session_context: created.append(session_context.id)
        context = ApplicationContext(Application(FunctionHandler(restore_app.full_app), hooks), "/r")
        context.restorer = restorer
        _workers.append((restorer, context))
        return restorer, context

    restorer, context = make(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    restorer.flush()
    restorer2, context2 = make(redis_data)
    restore_on(context2, restorer2)
    assert created == [session.id, session.id]


def test_random_model_ids_are_warned_about(monkeypatch, caplog):
    monkeypatch.setenv("BOKEH_SIMPLE_IDS", "no")
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        Restorer("redis://unused", client_factory=lambda url, timeout: FakeRedis({}))
    assert "BOKEH_SIMPLE_IDS is off" in caplog.text


def _counting_app(doc):
    from bokeh.models import Div, Slider

    moves = Div(text="0", name="moves")
    slider = Slider(start=0, end=10, value=1, name="slider")
    slider.on_change("value", lambda attr, old, new: setattr(moves, "text", str(int(moves.text) + 1)))
    doc.add_root(slider)
    doc.add_root(moves)


def test_a_callback_sees_only_the_latest_value_of_each_property_on_replay(redis_data):
    restorer, context = make_worker(redis_data, app=_counting_app)
    session = new_session(context)
    for value in (2, 3, 4):
        patch(session, changed(one(session.document, "slider"), "value", value))
    assert one(session.document, "moves").text == "3"
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, app=_counting_app)
    doc = restore_on(context2, restorer2).document
    assert (one(doc, "slider").value, one(doc, "moves").text) == (4, "1")


def test_a_dropped_restorer_is_freed_and_its_flusher_ends():
    import gc
    import weakref

    import gevent

    restorer = Restorer("redis://unused", flush_ms=10, client_factory=lambda url, timeout: FakeRedis({}))
    context = ApplicationContext(Application(FunctionHandler(restore_app.full_app)), "/r")
    context.restorer = restorer
    session = new_session(context)
    flusher = restorer._flusher
    assert flusher is not None and not flusher.dead
    context.destroy_all(force=True)
    ref = weakref.ref(restorer)
    del restorer, context, session
    gc.collect()
    gevent.sleep(0.05)
    assert ref() is None and flusher.dead


def test_changes_around_two_rebuilds_replay_through_both(redis_data):
    """select, zoom the figure it built, select back, zoom that figure: the
    second select must not move ahead of the first zoom (which names a model
    of the first rebuilt figure), else the replay lands elsewhere."""
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    doc = session.document
    select = one(doc, "select")
    patch(session, changed(select, "value", "scatter"))
    xr = one(doc, "layout").children[3].x_range
    patch(session, changed(xr, "start", 1.5))
    patch(session, changed(select, "value", "line"))
    xr = one(doc, "layout").children[3].x_range
    patch(session, changed(xr, "start", 3.5))
    assert session.recorder.epoch == 2
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    restored = restore_on(context2, restorer2).document
    plot = one(restored, "layout").children[3]
    assert (one(restored, "select").value, plot.title.text, plot.x_range.start) == ("line", "line", 3.5)
    assert restorer2.figures["restored"] == 1 and restorer2.figures["fresh_because_mismatch"] == 0


#: The clamping app's limit; tests change it between "workers".
LIMIT = [10]


def _clamping_app(doc):
    from bokeh.models import Slider

    slider = Slider(start=0, end=100, value=1, name="slider")

    def clamp(attr, old, new):
        if new > LIMIT[0]:
            slider.value = LIMIT[0]

    slider.on_change("value", clamp)
    doc.add_root(slider)


def test_replayed_values_that_come_out_otherwise_give_a_fresh_session(redis_data, caplog):
    LIMIT[0] = 10
    restorer, context = make_worker(redis_data, app=_clamping_app)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    assert one(session.document, "slider").value == 10
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, app=_clamping_app)
    assert one(restore_on(context2, restorer2, ).document, "slider").value == 10, "same limit: restored"
    assert restorer2.figures["restored"] == 1
    LIMIT[0] = 50  # same source and structure, another outcome
    try:
        restorer3, context3 = make_worker(redis_data, app=_clamping_app)
        with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
            fresh = restore_on(context3, restorer3)
    finally:
        LIMIT[0] = 10
    assert one(fresh.document, "slider").value == 1 and restorer3.figures["fresh_because_mismatch"] == 1
    assert "replayed values differ" in caplog.text


def test_a_value_the_server_changed_after_the_browser_set_it_restores_fresh(redis_data):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    # A periodic callback moving the slider, say.
    session.with_document_locked(lambda: setattr(one(session.document, "slider"), "value", 7))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data)
    fresh = restore_on(context2, restorer2)
    assert one(fresh.document, "slider").value == 1 and restorer2.figures["fresh_because_mismatch"] == 1


def _server(redis_data):
    from flask_docsync.config import Settings
    from flask_docsync.server import DocSyncServer

    server = DocSyncServer(Settings.load({"DOCSYNC_SECRET_KEY": "x" * 40, "DOCSYNC_REDIS_URL": "redis://localhost:1/0",
                                          "DOCSYNC_RESTORE_SESSIONS": True}, {}))
    server.restorer._client_factory = lambda url, t: FakeRedis(redis_data)
    server.authorize = lambda *a, **k: True
    server.add_app("/r", restore_app.full_app)
    return server


def test_a_restore_goes_to_the_sessions_user_only(redis_data):
    from flask_docsync.errors import TokenError

    first, heir = _server(redis_data), _server(redis_data)
    try:
        assert first.router.tag != heir.router.tag
        sid = first.tokens.new_session_id(owner=first.router.tag)
        session = first.create_session("/r", RequestData(user="alice"), session_id=sid)
        token = session.token
        session.document.session_context._docsync_state["clicks"] = 123
        patch(session, changed(one(session.document, "slider"), "value", 42))
        first.restorer.flush()
        meta = json.loads(next(iter(redis_data.values()))[b"meta"])
        assert meta["user"] and "alice" not in json.dumps(meta), "an HMAC of the user, not the user"
        with pytest.raises(TokenError, match="belongs to another user"):
            first.session_for_token("/r", token, RequestData(user="bob"))
        # The first worker is gone: the heir gets the reconnects.
        with pytest.raises(TokenError, match="belongs to another user"):
            heir.session_for_token("/r", token, RequestData(user="bob"))
        assert heir.get_context("/r").get_session(sid) is None
        restored = heir.session_for_token("/r", token, RequestData(user="alice"))
        assert one(restored.document, "slider").value == 42
        assert heir.restorer.figures["restored"] == 1 and heir.restorer.figures["refused_user"] == 1
    finally:
        first.stop()
        heir.stop()


def test_sessions_whose_data_redis_lost_are_written_again(redis_data, redis_server):  # noqa: F811
    restorer, context = _real_worker(redis_server.url)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    assert restorer.flush() == 1
    key = session.recorder.key
    redis_server.restart(0.2)  # no persistence: a restart (or failover, eviction) loses the keys
    assert not redis_server.client().exists(key)
    try:
        restorer.flush(everyone=True)
    except Exception:  # the client's connection died with the server
        restorer.flush(everyone=True)
    assert redis_server.client().exists(key), "a stop's save writes every session"
    restorer2, context2 = _real_worker(redis_server.url)
    assert one(restore_on(context2, restorer2).document, "slider").value == 42

    # The periodic refresh of TTLs notices a lost key, and the next flush writes it.
    redis_server.client().delete(key)
    restorer._last_touch = 0
    restorer.flush()
    restorer.flush()
    assert redis_server.client().exists(key)


@pytest.mark.parametrize("real", [False, True], ids=["fake", "redis-server"])
def test_two_copies_of_a_session_do_not_undo_each_other(redis_data, real, request):
    # Host A's live session S; host B made S anew (its worker was taken for
    # gone, or routing failed): both record under one key.
    if real:
        url = request.getfixturevalue("redis_server").url
        worker = lambda: _real_worker(url)  # noqa: E731
        data = lambda key: request.getfixturevalue("redis_server").client().hgetall(key)  # noqa: E731
    else:
        worker = lambda: make_worker(redis_data)  # noqa: E731
        data = lambda key: redis_data.get(key)  # noqa: E731
    rA, cA = worker()
    sA = new_session(cA)
    patch(sA, changed(one(sA.document, "slider"), "value", 10))
    rA.flush()
    rB, cB = worker()
    sB = new_session(cB)  # the copy the user now uses: it claims the key
    patch(sB, changed(one(sB.document, "slider"), "value", 77))
    assert rB.flush() == 1
    key = sB.recorder.key
    # A's late save (its stop's second save_all) does not overwrite B's data.
    patch(sA, changed(one(sA.document, "slider"), "value", 11))
    rA.flush()
    rA.save_all()
    rA.restart()
    assert b"77" in data(key)[b"changes"]
    assert rA.stats()["not_owner"] >= 1
    # A's copy is discarded as unused: B's data stays.
    assert cA.discard_session(sA)
    rA.flush()
    assert data(key), "a discard deletes only its own copy's data"
    rC, cC = worker()
    assert one(restore_on(cC, rC).document, "slider").value == 77


class _UnreadableRedis(FakeRedis):
    def hgetall(self, key):
        raise ConnectionError("Redis is unreachable for reads")


def _stateless_app(doc):
    from bokeh.layouts import column
    from bokeh.models import Div, Slider

    doc.add_root(column(Slider(start=0, end=100, value=1, name="slider"), Div(text="x")))


@pytest.mark.parametrize("why", ["busy", "error"])
def test_a_fresh_session_for_a_gone_workers_id_replaces_its_older_data(redis_data, monkeypatch, why):
    # An app without restorable state: the fresh session has nothing of its own to save.
    restorer, context = make_worker(redis_data, app=_stateless_app)
    session = new_session(context)
    patch(session, changed(one(session.document, "slider"), "value", 42))
    restorer.flush()
    # The worker died; its heir gives the reconnect a fresh session.
    if why == "busy":
        monkeypatch.setattr(restore_module, "RESTORE_WAIT_SECONDS", 0.01)
        heir, heir_context = make_worker(redis_data, app=_stateless_app, concurrency=1)
        heir._slots.acquire()
        fresh = restore_on(heir_context, heir)
        heir._slots.release()
    else:
        heir, heir_context = make_worker(redis_data, app=_stateless_app)
        heir._client = _UnreadableRedis(redis_data)
        fresh = restore_on(heir_context, heir)
        heir._client = FakeRedis(redis_data)
    assert one(fresh.document, "slider").value == 1
    assert heir.figures[f"fresh_because_{why}"] == 1
    heir.flush()  # the user changed nothing the recorder records
    # The heir dies too: the next restore gives what the fresh session had, not the older values.
    third, third_context = make_worker(redis_data, app=_stateless_app)
    assert one(restore_on(third_context, third).document, "slider").value == 1


@pytest.mark.parametrize("damage", ["no changes", "changes not a list", "state not a dict", "no state", "no meta",
                                    "meta not a dict"])
def test_damaged_saved_data_gives_a_fresh_session(redis_data, caplog, damage):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    # A cell edit: what the skeleton and the values check do not see.
    patch(session, {"kind": "ColumnsPatched", "model": {"id": one(session.document, "source").id}, "attr": "data",
                    "patches": {"type": "map", "entries": [["score", [[1, 99]]]]}})
    session.document.session_context._docsync_state["clicks"] = 5
    restorer.flush()
    fields = redis_data[session.recorder.key]
    field, value = {
        "no changes": (b"changes", None), "changes not a list": (b"changes", b'{"a": 1}'),
        "state not a dict": (b"state", b"[1, 2]"), "no state": (b"state", None), "no meta": (b"meta", None),
        "meta not a dict": (b"meta", b"[]"),
    }[damage]
    if value is None:
        fields.pop(field)
    else:
        fields[field] = value
    restorer2, context2 = make_worker(redis_data)
    with caplog.at_level(logging.WARNING, "flask_docsync.restore"):
        fresh = restore_on(context2, restorer2)
    assert 99 not in one(fresh.document, "source").data["score"]
    assert one(fresh.document, "clicks").text == "clicks: 0"
    assert restorer2.figures["restored"] == 0 and restorer2.figures["fresh_because_mismatch"] == 1
    assert "cannot be restored faithfully" in caplog.text


def test_skip_reasons_are_fixed_labels_that_clients_cannot_grow_or_forge(redis_data, caplog):
    restorer, context = make_worker(redis_data)
    session = new_session(context)
    caplog.set_level(logging.DEBUG, "flask_docsync.restore")
    for i in range(300):
        for event in ({"kind": f"Evil{i}\n2026-12-07 INFO forged line" + "K" * 10_000},
                      {"kind": "MessageSent", "msg_type": f"t{i}\nforged",
                       "msg_data": {"type": "event", "name": f"n{i}\nforged" + "K" * 10_000}}):
            try:
                patch(session, event)
            except Exception:
                pass
    recorder = session.recorder
    assert recorder.skipped == 600
    assert len(recorder._skipped) <= 4 and sum(map(len, recorder._skipped)) < 200
    assert len(restorer._logged_skips) <= 4
    lines = [r.getMessage() for r in caplog.records if r.name == "flask_docsync.restore"]
    assert 0 < len(lines) <= 4
    assert not any("\n" in line or "forged" in line or "KKK" in line for line in lines), lines


def _many_sliders_app(doc):
    from bokeh.layouts import column
    from bokeh.models import Div, Slider

    doc.add_root(column(*[Slider(start=0, end=100, value=1, name=f"s{i}") for i in range(50)],
                        *[Div(text=str(i)) for i in range(500)]))


def test_a_replay_reuses_the_rank_table_while_the_models_stay(redis_data, monkeypatch):
    restorer, context = make_worker(redis_data, app=_many_sliders_app)
    session = new_session(context)
    for i in range(50):
        patch(session, changed(one(session.document, f"s{i}"), "value", 5))
    restorer.flush()
    restorer2, context2 = make_worker(redis_data, app=_many_sliders_app)
    built = []
    original = restore_module.Ranks.__init__

    def counted(self, doc):
        built.append(1)
        original(self, doc)

    monkeypatch.setattr(restore_module.Ranks, "__init__", counted)
    restored = restore_on(context2, restorer2)
    assert restorer2.figures["restored"] == 1 and one(restored.document, "s49").value == 5
    assert len(built) <= 5, f"{len(built)} rank tables for 50 messages that changed no models"


def test_another_user_is_refused_before_the_saved_data_is_checked(redis_data):
    from flask_docsync.errors import TokenError

    restorer, context = make_worker(redis_data)
    token = generate_jwt_token("sess1", signed=False, secret_key=None)
    session = context.create_session_if_needed("sess1", RequestData(user="alice"), token, {})
    patch(session, changed(one(session.document, "slider"), "value", 42))
    restorer.flush()
    saved = dict(redis_data[session.recorder.key])
    heir, heir_context = make_worker(redis_data, app=_other_app)  # a deploy changed the script
    with pytest.raises(TokenError, match="belongs to another user"):
        heir.restore(heir_context, "sess1", RequestData(user="bob"), token, {})
    heir.flush()
    assert redis_data[session.recorder.key] == saved, "bob's reconnect neither took nor deleted alice's data"
    assert heir.figures["fresh_because_mismatch"] == 0
