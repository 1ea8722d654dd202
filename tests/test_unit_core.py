"""Fast unit tests of the transport-neutral core (no sockets, no Flask)."""

from __future__ import annotations

import json
import time

import gevent
import gevent.event
import gevent.monkey
import pytest
from bokeh.application import Application
from bokeh.application.handlers.function import FunctionHandler
from bokeh.document import Document, without_document_lock
from bokeh.models import Button, Div, Slider
from bokeh.util.token import generate_jwt_token

from flask_docsync.config import Settings, parse_bool
from flask_docsync.context import ApplicationContext, RequestData
from flask_docsync.errors import ConfigurationError, ProtocolViolation, TokenError
from flask_docsync.protocol import MessageDecoder, encode, protocol
from flask_docsync.tokens import TokenPolicy, origin_refusal


class Recorder:
    """A subscriber that keeps the frames a session sends it."""

    def __init__(self) -> None:
        self.messages: list[list] = []

    def send_frames(self, frames):
        self.messages.append(frames)

    def events(self):
        out = []
        for frames in self.messages:
            header = json.loads(frames[0])
            if header["msgtype"] == "PATCH-DOC":
                out.extend(json.loads(frames[2])["events"])
        return out


def make_context(modify_doc) -> ApplicationContext:
    return ApplicationContext(Application(FunctionHandler(modify_doc)), "/t")


def new_session(context: ApplicationContext, session_id: str = "s1"):
    token = generate_jwt_token(session_id, signed=False, secret_key=None)
    return context.create_session_if_needed(session_id, RequestData(), token, {})


# protocol ------------------------------------------------------------------

def test_encode_decode_round_trip_with_buffers():
    import numpy as np
    from bokeh.document import Document
    from bokeh.models import ColumnDataSource

    doc = Document()
    doc.add_root(ColumnDataSource(data={"x": np.arange(5, dtype="float64")}))
    frames = encode(protocol.create("PULL-DOC-REPLY", "req1", doc))
    assert [type(f) for f in frames] == [str, str, str, str, bytes]
    assert json.loads(frames[0])["num_buffers"] == 1
    push = protocol.create("PUSH-DOC", doc)
    decoder = MessageDecoder()
    result = None
    for frame in encode(push):
        result = decoder.feed(frame)
    assert result is not None and result.msgtype == "PUSH-DOC"
    assert len(result.buffers) == 1


@pytest.mark.parametrize(
    "frames, fragment",
    [
        (["not json"], "not valid JSON"),
        ([b"\x00binary"], "text frame"),
        ([json.dumps({"msgid": "1", "msgtype": "NOPE"})], "unknown message type"),
        ([json.dumps({"msgid": "1"})], "'msgtype'"),
        ([json.dumps({"msgid": "1", "msgtype": "PATCH-DOC", "num_buffers": 10**9})], "num_buffers"),
        ([json.dumps({"msgid": "1", "msgtype": "ACK"}), "{}", "{}"], "sent by servers"),
        ([json.dumps({"msgid": "1", "msgtype": "PATCH-DOC", "num_buffers": 1}), "{}", '{"events": []}', b"x"], "malformed"),
        ([json.dumps({"msgid": "1", "msgtype": "PATCH-DOC"}), "{}", "{bad"], "malformed"),
    ],
)
def test_decoder_refuses_with_protocol_error(frames, fragment):
    decoder = MessageDecoder()
    with pytest.raises(ProtocolViolation) as info:
        for frame in frames:
            decoder.feed(frame)
    assert info.value.code == 1002
    assert fragment in info.value.reason


# config and tokens ------------------------------------------------------------

def test_parse_bool_reads_false_as_false():
    assert parse_bool("false", "X") is False
    assert parse_bool("True", "X") is True
    with pytest.raises(ConfigurationError):
        parse_bool("maybe", "X")


def test_settings_errors_say_what_to_set():
    with pytest.raises(ConfigurationError, match="DOCSYNC_SECRET_KEY"):
        Settings.load({"DOCSYNC_SIGN_SESSIONS": "true"}, {})
    with pytest.raises(ConfigurationError, match="not both"):
        Settings.load({}, {"include_cookies": ["a"], "exclude_cookies": ["b"]})
    with pytest.raises(ConfigurationError, match="Unknown DocSync option"):
        Settings.load({}, {"keepalive": 1})
    settings = Settings.load({"DOCSYNC_KEEP_ALIVE_MS": "0"}, {"keep_alive_ms": 5, "url_prefix": "apps/"})
    assert settings.keep_alive_ms == 0 and settings.url_prefix == "/apps"


def test_tokens_signed_round_trip_and_refusals():
    settings = Settings.load({}, {"secret_key": "k" * 32})
    policy = TokenPolicy(settings)
    assert policy.signed
    sid = policy.new_session_id()
    token = policy.make_token(sid, {"a": [b"1"]}, {"Host": "h", "X-Big": "y"}, {"c": "v"})
    got_id, payload = policy.decode(token)
    assert got_id == sid and payload["arguments"] == {"a": [b"1"]}
    assert payload["headers"] == {} and payload["cookies"] == {}  # include lists empty by default
    policy.check_expiry(payload)
    foreign = generate_jwt_token(sid, secret_key=b"other" * 8, signed=True)
    with pytest.raises(TokenError, match="signature"):
        policy.decode(foreign)
    with pytest.raises(TokenError, match="malformed"):
        policy.decode("%%%")
    with pytest.raises(TokenError):
        policy.check_session_id("chosen-by-client")
    with pytest.raises(TokenError, match="expired"):
        policy.check_expiry({"session_expiry": time.time() - 1})


def test_token_include_lists():
    settings = Settings.load({}, {"include_cookies": ["*"], "include_headers": ["Host"]})
    token = TokenPolicy(settings).make_token("x" * 44, {}, {"Host": "h", "Cookie": "c=v", "Other": "o"}, {"c": "v"})
    _, payload = TokenPolicy(settings).decode(token)
    assert payload["headers"] == {"Host": "h"} and payload["cookies"] == {"c": "v"}


@pytest.mark.parametrize(
    "origin, host, allowlist, kwargs, allowed",
    [
        (None, "a:5006", (), {}, True),
        # Same origin is trusted for loopback names, TRUSTED_HOSTS and the
        # allowlist's hosts only: a DNS-rebinding page is same-origin too.
        ("http://a:5006", "a:5006", (), {}, False),
        ("http://localhost:5006", "localhost:5006", (), {}, True),
        ("http://127.0.0.2:5006", "127.0.0.2:5006", (), {}, True),
        ("http://[::1]:5006", "[::1]:5006", (), {}, True),
        ("http://a:5006", "a:5006", (), {"trusted_hosts": ["a"]}, True),
        ("http://b.a:5006", "b.a:5006", (), {"trusted_hosts": [".a"]}, True),
        ("http://a:5006", "a:5006", ("a:5006",), {}, True),
        ("https://a", "a", ("a",), {}, True),  # Bokeh: a bare host means port 80, even for https
        # flask-docsync serve: the allowlist and the bind address, nothing else.
        ("http://127.0.0.1:5006", "127.0.0.1:5006", ("localhost:5006",), {"same_origin_hosts": ("127.0.0.1:*",)}, True),
        ("http://127.0.0.1:8443", "127.0.0.1:8443", ("localhost:5006",), {"same_origin_hosts": ("127.0.0.1:*",)}, True),
        ("http://[::1]:8443", "[::1]:8443", (), {"same_origin_hosts": ("[::1]:*",)}, True),
        ("http://localhost:5007", "localhost:5007", ("localhost:5006",), {"same_origin_hosts": ("127.0.0.1:*",)}, False),
        ("http://localhost:5006", "localhost:5006", ("a:80",), {"same_origin_hosts": ("127.0.0.1:*",)}, False),
        ("http://a:5006", "a:5006", (), {"same_origin_hosts": (), "trusted_hosts": ["a"]}, False),
        ("http://evil:5006", "a:5006", (), {}, False),
        ("http://evil:5006", "a:5006", (), {"trusted_hosts": ["a", "evil"]}, False),  # not the same origin
        ("http://example.com", "a:5006", ("example.com:80",), {}, True),
        ("http://example.com:81", "a:5006", ("example.com:80",), {}, False),
        ("http://x.y", "a", ("*",), {}, True),
        ("null", "a", (), {}, False),
    ],
)
def test_origin_allowed(origin, host, allowlist, kwargs, allowed):
    scheme = "https" if (origin or "").startswith("https") else "http"
    assert (origin_refusal(origin, host, scheme, allowlist, **kwargs) is None) is allowed


# sessions ---------------------------------------------------------------------

def test_patch_sends_callback_effect_once_serialized_to_all_and_suppresses_echo(contexts):
    def app(doc):
        slider = Slider(start=0, end=10, value=1, name="s")
        div = Div(text="", name="d")
        slider.on_change("value", lambda a, o, n: setattr(div, "text", f"v={n}"))
        doc.add_root(slider)
        doc.add_root(div)

    context = make_context(app)
    contexts.append(context)
    session = new_session(context)
    a, b = Recorder(), Recorder()
    session.subscribe(a)
    session.subscribe(b)
    slider = session.document.select_one({"name": "s"})
    msg = protocol.assemble(
        json.dumps({"msgid": "m1", "msgtype": "PATCH-DOC"}), "{}",
        json.dumps({"events": [{"kind": "ModelChanged", "model": {"id": slider.id}, "attr": "value", "new": 5}]}),
    )
    reply = session.handle_patch(msg, a)
    header = json.loads(reply[0])
    assert header["msgtype"] == "OK" and header["reqid"] == "m1" and reply[1:] == ["{}", "{}"]
    assert [e["attr"] for e in a.events()] == ["text"]  # no echo of "value"
    assert sorted(e["attr"] for e in b.events()) == ["text", "value"]
    # the callback's patch is the very same frames object for both: serialized once
    a_text = [m for m in a.messages if "v=5" in m[2]][0]
    b_text = [m for m in b.messages if "v=5" in m[2]][0]
    assert a_text is b_text


def test_patches_before_raise_are_flushed(contexts):
    def app(doc):
        slider = Slider(start=0, end=10, value=1, name="s")
        div = Div(text="", name="d")

        def cb(attr, old, new):
            div.text = "before"
            raise RuntimeError("boom")

        slider.on_change("value", cb)
        doc.add_root(slider)
        doc.add_root(div)

    context = make_context(app)
    contexts.append(context)
    session = new_session(context)
    rec = Recorder()
    session.subscribe(rec)
    slider = session.document.select_one({"name": "s"})
    msg = protocol.assemble(
        json.dumps({"msgid": "m1", "msgtype": "PATCH-DOC"}), "{}",
        json.dumps({"events": [{"kind": "ModelChanged", "model": {"id": slider.id}, "attr": "value", "new": 5}]}),
    )
    with pytest.raises(RuntimeError):
        session.handle_patch(msg, Recorder())
    assert {"kind": "ModelChanged", "model": {"id": session.document.select_one({"name": "d"}).id},
            "attr": "text", "new": "before"} in rec.events()


def test_new_model_reaches_every_connection_in_full(contexts):
    def app(doc):
        doc.add_root(Div(text="root"))

    context = make_context(app)
    contexts.append(context)
    session = new_session(context)
    a, b = Recorder(), Recorder()
    session.subscribe(a)
    session.subscribe(b)
    session.with_document_locked(lambda: session.document.add_root(Button(label="new")))
    for rec in (a, b):
        [event] = rec.events()
        assert event["kind"] == "RootAdded" and event["model"]["type"] == "object"


def test_periodic_runs_without_overlap_and_survives_errors(contexts):
    spans: list[tuple[float, float]] = []
    calls = {"n": 0}

    def app(doc):
        def slow():
            start = time.monotonic()
            gevent.sleep(0.03)
            spans.append((start, time.monotonic()))

        def bad():
            calls["n"] += 1
            raise ValueError("periodic failure")

        doc.add_periodic_callback(slow, 10)
        doc.add_periodic_callback(bad, 10)
        doc.add_root(Div())

    context = make_context(app)
    contexts.append(context)
    new_session(context)
    gevent.sleep(0.3)
    assert len(spans) >= 3 and calls["n"] >= 3
    for (s1, e1), (s2, _) in zip(spans, spans[1:]):
        assert s2 >= e1


def test_thread_hands_work_to_session(contexts):
    Thread = gevent.monkey.get_original("threading", "Thread")
    seen = []

    def app(doc):
        div = Div(text="", name="d")
        doc.add_root(div)

        def work():
            doc.add_next_tick_callback(lambda: setattr(div, "text", "from thread"))

        Thread(target=work).start()

    context = make_context(app)
    contexts.append(context)
    session = new_session(context)
    for _ in range(100):
        gevent.sleep(0.01)
        if session.document.select_one({"name": "d"}).text == "from thread":
            seen.append(True)
            break
    assert seen


def test_concurrent_creation_happens_once_and_failure_frees_the_id(contexts):
    created = {"n": 0}
    fail = {"on": True}

    def app(doc):
        created["n"] += 1
        gevent.sleep(0.05)
        if fail["on"]:
            raise RuntimeError("app failed")
        doc.add_root(Div())

    context = make_context(app)
    contexts.append(context)
    results = [gevent.spawn(new_session, context, "same") for _ in range(3)]
    gevent.joinall(results)
    assert created["n"] == 1
    assert all(isinstance(g.exception, RuntimeError) for g in results)
    fail["on"] = False
    sessions = [gevent.spawn(new_session, context, "same") for _ in range(3)]
    gevent.joinall(sessions)
    assert created["n"] == 2
    assert len({id(g.value) for g in sessions}) == 1


def test_discard_runs_destroy_hooks_and_destroys_document(contexts):
    destroyed = []

    def app(doc):
        doc.add_root(Div())
        doc.on_session_destroyed(lambda ctx: destroyed.append(ctx.id))
        doc.add_periodic_callback(lambda: None, 10)

    context = make_context(app)
    contexts.append(context)
    session = new_session(context, "gone")
    assert session.callback_count == 1
    session.request_expiration()
    assert context.cleanup_unused_sessions(10_000) == 1
    assert destroyed == ["gone"] and session.destroyed and session.callback_count == 0
    assert context.get_session("gone") is None


def test_raising_callback_leaves_no_curdoc_behind(contexts):
    from bokeh.io import curdoc

    def app(doc):
        slider = Slider(start=0, end=10, value=1, name="s")
        slider.on_change("value", lambda a, o, n: 1 / 0)
        doc.add_root(slider)

    context = make_context(app)
    contexts.append(context)
    session = new_session(context)
    slider = session.document.select_one({"name": "s"})
    msg = protocol.assemble(
        json.dumps({"msgid": "m1", "msgtype": "PATCH-DOC"}), "{}",
        json.dumps({"events": [{"kind": "ModelChanged", "model": {"id": slider.id}, "attr": "value", "new": 5}]}),
    )
    before = curdoc()
    with pytest.raises(ZeroDivisionError):
        session.handle_patch(msg, Recorder())
    assert curdoc() is before


def test_curdoc_is_per_greenlet(contexts):
    from bokeh.io import curdoc

    results: list[bool] = []

    def app(doc):
        def check():
            first = curdoc()
            gevent.sleep(0.005)
            results.append(first is doc and curdoc() is doc)

        doc.add_periodic_callback(check, 5)
        doc.add_root(Div())

    context = make_context(app)
    contexts.append(context)
    for i in range(3):
        new_session(context, f"s{i}")
    gevent.sleep(0.2)
    assert len(results) > 10 and all(results)


def test_discard_does_not_run_a_full_gc_per_session_and_frees_models(contexts, monkeypatch):
    import gc
    import weakref

    refs = []

    def app(doc):
        div = Div(text="x")
        refs.append(weakref.ref(div))
        doc.add_root(div)

    context = make_context(app)
    contexts.append(context)
    sessions = [new_session(context, f"g{i}") for i in range(5)]
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    for session in sessions:
        session.request_expiration()
    assert context.cleanup_unused_sessions(10_000) == 5
    monkeypatch.setattr(gc, "collect", real_collect)
    assert calls == []
    del sessions, session
    gc.collect()
    assert all(ref() is None for ref in refs)


# discard and async --------------------------------------------------------------

def test_a_destroyed_session_is_never_found_nor_subscribed(contexts):
    """While a discard runs, the id is out of reach; a request for it waits and gets a new session."""
    def app(doc):
        doc.add_root(Div(text="x", name="d"))

    context = make_context(app)
    contexts.append(context)
    first = new_session(context, "gone")
    assert context.discard_session(first)
    assert first.destroyed and context.get_session("gone") is None
    assert first.subscribe(Recorder()) is False and first.connection_count == 0

    second = new_session(context, "slow")
    release = gevent.event.Event()
    # A callback that takes its time to stop keeps the discard busy.
    def stubborn():
        try:
            gevent.sleep(60)
        except gevent.GreenletExit:
            release.wait(5)
            raise
    second.document.add_periodic_callback(without_document_lock(stubborn), 10)
    gevent.sleep(0.05)
    discard = gevent.spawn(context.discard_session, second)
    gevent.sleep(0.05)
    assert context.get_session("slow") is None, "findable while being discarded"
    joiner = gevent.spawn(new_session, context, "slow")
    gevent.sleep(0.05)
    assert not joiner.ready(), "a new session was handed out before the discard ended"
    release.set()
    assert discard.get(timeout=5) is True
    third = joiner.get(timeout=5)
    assert third is not second and not third.destroyed


def test_resolve_on_the_loop_itself_raises_instead_of_waiting_forever():
    from flask_docsync import aio

    async def inner():
        return 1

    async def outer():
        with pytest.raises(RuntimeError, match="use 'await'"):
            aio.resolve(inner())
        return await inner()

    assert aio.resolve(outer()) == 1


def test_a_killed_waiter_cancels_its_coroutine():
    import asyncio

    from flask_docsync import aio

    seen = []

    async def forever():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    waiter = gevent.spawn(aio.resolve, forever())
    gevent.sleep(0.05)
    waiter.kill(timeout=5)
    assert seen == ["cancelled"]


def test_with_locked_document_before_the_session_exists_awaits_a_coroutine_function():
    from flask_docsync import aio
    from flask_docsync.context import ServerContext, SessionContext

    class Owner:
        pass

    owner = Owner()
    doc_holder = Div(text="before")
    doc = Document()
    doc.add_root(doc_holder)
    context = SessionContext(ServerContext(owner), "id", RequestData(), {}, doc)

    async def change(d):
        d.roots[0].text = "after"
        return "done"

    assert aio.resolve(context.with_locked_document(change)) == "done"
    assert doc_holder.text == "after"
