"""Broadcasts without Redis (one process): the API, its refusals, delivery
under each session's lock, the latest value for late subscribers, stats.

The Redis-backed path, across gunicorn workers and hosts, is in
tests/test_broadcast_redis.py.
"""

from __future__ import annotations

import gevent
import pytest
from flask import Flask

from conftest import APPS
from flask_docsync import BroadcastError, DocSync
from flask_docsync.testing import DocSyncTestClient


@pytest.fixture
def site():
    app = Flask(__name__)
    docsync = DocSync(url_prefix="/docsync")
    docsync.add_app("/numbers", str(APPS / "broadcast_app.py"))
    docsync.init_app(app)

    @app.post("/publish/<int:n>")
    def publish(n):
        docsync.broadcast("numbers", {"n": n})
        return "sent"

    yield app, docsync
    app.extensions["docsync"].stop()


def wait_for(predicate, timeout=5.0):
    deadline = gevent.Timeout(timeout)
    deadline.start()
    try:
        while not predicate():
            gevent.sleep(0.01)
    finally:
        deadline.close()


def texts(session):
    return tuple(session.model(name).text for name in ("count", "last", "order"))


def test_a_view_broadcasts_to_every_subscribed_session_in_one_order(site):
    app, _ = site
    http = app.test_client()
    with DocSyncTestClient(app) as client:
        sessions = [client.open("/numbers") for _ in range(3)]
        for n in range(1, 21):
            assert http.post(f"/publish/{n}").status_code == 200
        wait_for(lambda: all(s.model("count").text == "20" for s in sessions))
        assert len({texts(s) for s in sessions}) == 1 and texts(sessions[0])[1] == "20"
        # The changes reached the browsers, as any callback's do.
        assert all(s.browser_model("count").text == "20" for s in sessions)
        stats = client.server.stats()["broadcast"]
        assert stats["published"] == 20 and stats["delivered"] == 60 and stats["subscriptions"] == 3


def test_a_late_session_starts_from_the_latest_broadcast(site):
    app, docsync = site
    with app.app_context():
        docsync.broadcast("numbers", {"n": 5})
        docsync.broadcast("numbers", {"n": 6})
    with DocSyncTestClient(app) as client:
        early = client.open("/numbers")
        wait_for(lambda: early.model("count").text in ("1", "2"))
        gevent.sleep(0.05)
        late = client.open("/numbers")
        # In its first document, before any broadcast that follows.
        assert late.browser_model("last").text == "6" and late.model("count").text == "1"


def test_a_session_callback_broadcasts_to_the_others_and_itself(site):
    app, _ = site
    with DocSyncTestClient(app) as client:
        a, b = client.open("/numbers"), client.open("/numbers")
        a.click("send")
        wait_for(lambda: a.model("last").text == "-1" and b.model("last").text == "-1")


def test_a_failing_handler_is_logged_and_the_others_still_get_it(site, caplog):
    app, docsync = site
    with DocSyncTestClient(app) as client:
        good = client.open("/numbers")
        bad = client.open("/numbers")
        with bad.server_session.locked() as doc:
            doc.select_one({"name": "count"}).text = "not a number"
        with app.app_context():
            docsync.broadcast("numbers", {"n": 1})
        wait_for(lambda: good.model("count").text == "1")
        wait_for(lambda: client.server.stats()["broadcast"]["handler_errors"] == 1)
        assert "error in broadcast handler for 'numbers'" in caplog.text


@pytest.mark.parametrize("payload, message", [
    ({"when": object()}, "must be a JSON value"),
    (float("nan"), "must be a JSON value"),
    ("x" * 300_000, "over DOCSYNC_BROADCAST_MAX_BYTES"),
])
def test_payloads_that_are_not_json_or_too_big_are_refused(site, payload, message):
    app, docsync = site
    with app.app_context(), pytest.raises(BroadcastError, match=message):
        docsync.broadcast("numbers", payload)


@pytest.mark.parametrize("topic", ["", "a\nb", "x" * 201, 7])
def test_bad_topics_are_refused(site, topic):
    app, docsync = site
    with app.app_context(), pytest.raises(BroadcastError, match="topic must be"):
        docsync.broadcast(topic, 1)


def test_subscribe_outside_a_served_app_says_where_it_works():
    import flask_docsync

    with pytest.raises(BroadcastError, match="docsync.broadcast"):
        flask_docsync.subscribe("numbers", print)


def test_a_destroyed_session_gets_nothing_more(site):
    app, docsync = site
    with DocSyncTestClient(app) as client:
        gone = client.open("/numbers")
        kept = client.open("/numbers")
        server_session = gone.server_session
        gone.close()
        wait_for(lambda: server_session.destroyed, timeout=20)
        with app.app_context():
            docsync.broadcast("numbers", {"n": 3})
        wait_for(lambda: kept.model("count").text == "1")
        assert client.server.stats()["broadcast"]["subscriptions"] == 1


@pytest.mark.parametrize("key, value, message", [
    ("DOCSYNC_REDIS_URL", "localhost:6379", "give a Redis URL such as redis://localhost:6379/0"),
    ("DOCSYNC_REDIS_PREFIX", "my app", "a short name without spaces"),
    ("DOCSYNC_BROADCAST_MAX_BYTES", 0, "at least 1"),
    ("DOCSYNC_BROADCAST_HISTORY", "many", "an integer number of broadcasts"),
    ("DOCSYNC_ADVERTISE_URL", "10.0.0.5:8000", "such as http://10.0.0.5:8000"),
    ("DOCSYNC_ADVERTISE_URL", "http://10.0.0.5", "with its port and no path"),
    ("DOCSYNC_ADVERTISE_URL", "http://10.0.0.5:8000/app", "with its port and no path"),
    ("DOCSYNC_ADVERTISE_URL", "https://10.0.0.5:8443", "plain-HTTP address"),
    ("DOCSYNC_ADVERTISE_URL", "http://0.0.0.0:8000", "not a wildcard"),
])
def test_redis_and_broadcast_settings_are_validated_by_name(key, value, message):
    from flask_docsync import ConfigurationError

    app = Flask(__name__)
    app.config[key] = value
    with pytest.raises(ConfigurationError, match=key) as caught:
        DocSync(app)
    assert message in str(caught.value)


def test_an_advertise_url_is_kept_as_its_base():
    from flask_docsync.config import Settings

    for given in ("http://10.0.0.5:8000", "http://10.0.0.5:8000/", " http://[::1]:8000 "):
        assert Settings.load({"DOCSYNC_ADVERTISE_URL": given}, {}).advertise_url == given.strip().rstrip("/")


def test_a_redis_password_stays_out_of_logs_and_stats():
    from flask_docsync.pubsub import Hub, safe_url

    assert safe_url("redis://user:s3cret@cache:6380/2") == "redis://user:***@cache:6380/2"
    assert "s3cret" not in str(Hub("redis://:s3cret@cache/0").stats())


def test_a_copy_resent_after_a_lost_reply_is_dropped_by_readers():
    # The publisher's outbox re-sends with the same publisher sequence when
    # it cannot know whether Redis took the first try.
    from flask_docsync.pubsub import Hub

    hub = Hub("redis://127.0.0.1:1/0")
    state = hub._topic("t")
    first = hub._decode(state, b"1-0", {b"p": b"1", b"u": b"pub:1"})
    again = hub._decode(state, b"2-0", {b"p": b"1", b"u": b"pub:1"})
    other = hub._decode(state, b"3-0", {b"p": b"2", b"u": b"other:1"})
    assert first is not None and again is None and other is not None
    assert state.last_id == "3-0" and hub.figures["duplicates"] == 1
    assert hub._decode(state, b"4-0", {b"x": b"not ours"}) is None and hub.figures["malformed"] == 1


def test_a_broadcast_from_a_worker_thread_is_refused_with_what_to_do(site):
    from flask_docsync import offload

    app, docsync = site

    def from_thread():
        with app.app_context():
            docsync.broadcast("numbers", {"n": 1})

    with pytest.raises(BroadcastError, match="return the payload from the thread"):
        offload(from_thread)


def test_a_destroyed_sessions_document_is_not_kept_by_its_subscription(site):
    # A function app's handler closes over its document, so only dropping
    # the subscription when the session goes lets the document be freed.
    import gc
    import weakref

    from bokeh.models import Div

    import flask_docsync

    app, docsync = site

    @docsync.app("/closure", app=app)
    def closure(doc):
        div = Div(text="-", name="div")
        doc.add_root(div)
        flask_docsync.subscribe("closure", lambda payload: setattr(div, "text", str(payload)) or doc)

    with DocSyncTestClient(app) as client:
        session = client.open("/closure")
        server_session = session.server_session
        ref = weakref.ref(server_session.document)
        assert client.server.stats()["broadcast"]["subscriptions"] == 1
        session.close()
        wait_for(lambda: server_session.destroyed, timeout=20)
    del server_session, session
    gc.collect()
    assert ref() is None, "the destroyed session's document is still referenced"
    assert client.server.stats()["broadcast"]["subscriptions"] == 0


def test_broadcasts_waiting_are_bounded_in_bytes_too():
    from flask_docsync.pubsub import MAX_WAITING_BYTES, Hub

    megabyte = "m" * (1024 * 1024 - 2)
    # In-process: published faster than delivered (no yield in between).
    hub = Hub(None, max_bytes=2 * 1024 * 1024)
    fits = MAX_WAITING_BYTES // (1024 * 1024)
    try:
        for _ in range(fits):
            hub.publish("t", megabyte)
        with pytest.raises(BroadcastError, match="wait to be delivered"):
            hub.publish("t", megabyte)
        assert hub.stats()["waiting_bytes"] <= MAX_WAITING_BYTES
    finally:
        hub.stop()
    # The outbox while Redis is unreachable (port 1: nobody listens).
    hub = Hub("redis://127.0.0.1:1/0", max_bytes=2 * 1024 * 1024)
    try:
        for i in range(fits):
            hub._queue("t", megabyte, f"p:{i}")
        with pytest.raises(BroadcastError, match="Start Redis again"):
            hub._queue("t", megabyte, "p:last")
        assert hub.stats()["outbox_bytes"] <= MAX_WAITING_BYTES
    finally:
        hub.stop()
