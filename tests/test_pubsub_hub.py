"""The broadcast Hub against a real redis-server, with stand-in sessions:
orderings that whole servers make hard to arrange (two topics read in one
XREAD, subscribers racing to prime a topic, a topic followed again after a
pause, Redis coming up after a subscriber, entries of someone else's).

Each scenario runs in a fresh interpreter with gevent's monkey-patching, as a
serving worker has it; the Hub refuses Redis without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, free_port
from redis_util import REDIS_SERVER, redis_server  # noqa: F401  (fixture)

pytest.importorskip("redis")

PRELUDE = '''
from gevent import monkey; monkey.patch_all()
import json, gc, gevent, redis
from flask_docsync.pubsub import Hub

class Session:
    destroyed = False
    def run_as_callback(self, func, *args, what=""):
        func(*args)
        return True

class Context:
    def __init__(self, session):
        self._session = session

class Doc:
    """Stands for a session's document: what the Hub reads of it."""
    def __init__(self):
        self.session_context = Context(Session())

r = redis.Redis.from_url(URL)
'''


def scenario(url: str, body: str) -> object:
    code = f"URL = {url!r}\n" + PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_publishers_broadcasts_on_two_topics_all_arrive(redis_server):  # noqa: F811
    # One XREAD lists its streams one after the other, so a publisher's
    # sequence is not in order across topics; nothing may be taken for a copy.
    got = scenario(redis_server.url, '''
        hub = Hub(URL, prefix="t1")
        doc, got = Doc(), []
        hub.subscribe(doc, "b", lambda p: got.append(["b", p]))
        hub.subscribe(doc, "a", lambda p: got.append(["a", p]))
        gevent.sleep(0.3)
        for seq, topic in enumerate("abababab", 1):
            r.xadd(f"t1:broadcast:{topic}", {"p": str(seq), "u": f"PUB:{seq}"})
        gevent.sleep(1.5)
        print(json.dumps(sorted(p for _, p in got)))
        hub.stop()
    ''')
    assert got == list(range(1, 9))


def test_sessions_racing_to_subscribe_get_the_latest_and_no_history(redis_server):  # noqa: F811
    got = scenario(redis_server.url, '''
        for i in range(1000):
            r.xadd("t2:broadcast:t", {"p": str(i), "u": f"OLD:{i}"})
        hub = Hub(URL, prefix="t2")
        got = [[] for _ in range(5)]
        docs = [Doc() for _ in range(5)]
        gevent.joinall([gevent.spawn(hub.subscribe, docs[i], "t", got[i].append) for i in range(5)])
        gevent.sleep(1.5)
        print(json.dumps(got))
        hub.stop()
    ''')
    assert got == [[999]] * 5


def test_a_topic_followed_again_starts_from_its_latest_broadcast(redis_server):  # noqa: F811
    got = scenario(redis_server.url, '''
        hub, publisher = Hub(URL, prefix="t3"), Hub(URL, prefix="t3")
        publisher.publish("t", "first")
        doc = Doc()
        hub.subscribe(doc, "t", lambda p: None)
        gevent.sleep(0.3)
        hub.forget(doc)  # its session is destroyed; nobody here follows "t"
        for i in range(300):
            publisher.publish("t", i)
        gevent.sleep(0.3)
        got, doc = [], Doc()  # the Hub holds documents weakly
        hub.subscribe(doc, "t", got.append)
        publisher.publish("t", "next")
        gevent.sleep(1.5)
        print(json.dumps({"got": got, "topics": sorted(hub._topics)}))
        hub.stop(); publisher.stop()
    ''')
    assert got == {"got": [299, "next"], "topics": ["t"]}


def test_a_session_subscribed_while_redis_was_down_gets_what_comes_after(redis_server):  # noqa: F811
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    got = scenario(url, f'''
        import subprocess
        hub, other_host = Hub(URL, prefix="t4"), Hub(URL, prefix="t4")
        got, doc = [], Doc()
        hub.subscribe(doc, "t", got.append)  # Redis is not up yet
        gevent.sleep(2.5)
        server = subprocess.Popen([{REDIS_SERVER!r}, "--port", "{port}", "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            gevent.sleep(0.3)
            other_host.publish("t", "Redis is back")
            gevent.sleep(6)
            print(json.dumps(got))
        finally:
            hub.stop(); other_host.stop(); server.terminate(); server.wait()
    ''')
    assert got == ["Redis is back"]


def test_someone_elses_entries_are_skipped_and_the_reader_goes_on(redis_server):  # noqa: F811
    got = scenario(redis_server.url, '''
        hub, publisher = Hub(URL, prefix="t5"), Hub(URL, prefix="t5")
        got, doc = [], Doc()
        hub.subscribe(doc, "t", got.append)
        gevent.sleep(0.3)
        r.xadd("t5:broadcast:t", {"p": b"1", "u": b"\\xff:1"})
        r.xadd("t5:broadcast:t", {"other": b"field"})
        gevent.sleep(0.3)
        publisher.publish("t", "after")
        gevent.sleep(1.5)
        print(json.dumps({"got": got, "reader_alive": not hub._reader.dead, "malformed": hub.figures["malformed"]}))
        hub.stop(); publisher.stop()
    ''')
    assert got == {"got": [1, "after"], "reader_alive": True, "malformed": 1}


def test_redis_without_monkey_patching_is_refused_with_what_to_do():
    from flask_docsync import ConfigurationError
    from flask_docsync.pubsub import Hub

    hub = Hub("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="monkey.patch_all"):
        hub.publish("t", 1)


def test_after_a_redis_restart_a_hub_sends_its_last_broadcasts_again(redis_server):  # noqa: F811
    # A restarted Redis (no persistence) is empty, and a busy reader may not
    # have fetched the last entries: they go in again, with the publisher's
    # sequence, so readers that had them drop the copies.
    from flask_docsync.pubsub import Hub

    hub = Hub(redis_server.url, prefix="t6")
    try:
        uniques = [hub._xadd("t", str(i)) and hub._recent[-1][3] for i in range(3)]
        redis_server.restart(down_for=0.2)
        hub._xadd("t", "3")  # redis-py reconnects by itself; the hub sees the new run
        entries = redis_server.client().xrange("t6:broadcast:t")
        assert [fields[b"u"].decode() for _, fields in entries][:3] == uniques
        assert [fields[b"p"] for _, fields in entries] == [b"0", b"1", b"2", b"3"]
    finally:
        hub._drop_publisher()
