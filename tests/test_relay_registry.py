"""Unit tests of the parts hosts route with: relay headers, the relay's copying, the registry in Redis.

The registry runs against a real redis-server (tests/redis_util.py); the
relay copies between real sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import time
from unittest import mock

import gevent
import gevent.server
import gevent.socket
import pytest

from flask_docsync import registry, relay
from redis_util import redis_server  # noqa: F401  (fixture)

SECRET = b"relay-secret"
HEADERS = {"HTTP_COOKIE": "login=alice", "HTTP_ORIGIN": "https://example.com", "HTTP_HOST": "example.com",
           "HTTP_SEC_WEBSOCKET_PROTOCOL": "bokeh, token", "HTTP_X_DOCSYNC_RELAY_FOR": "203.0.113.7"}
REQUEST = ("GET", "/app/ws?x=1", relay.headers_digest(HEADERS))


def signed(hops: int = 1, host: str = "aaaaaa", scheme: str = "https", secret: bytes = SECRET) -> str:
    return relay.sign(secret, hops, host, scheme, *REQUEST)


# -- relay headers -------------------------------------------------------------


def test_a_signed_header_gives_its_hops_host_and_scheme():
    assert relay.verify(signed(), SECRET, *REQUEST) == relay.Relayed(1, "aaaaaa", "https")


@pytest.mark.parametrize("changed", ["method", "path", "HTTP_COOKIE", "HTTP_ORIGIN", "HTTP_HOST",
                                     "HTTP_SEC_WEBSOCKET_PROTOCOL", "HTTP_X_DOCSYNC_RELAY_FOR", "HTTP_X_EXTRA"])
def test_a_header_for_another_request_is_refused(changed):
    method, path, _ = REQUEST
    headers = dict(HEADERS)
    if changed == "method":
        method = "POST"
    elif changed == "path":
        path += "&y=2"
    else:
        headers[changed] = headers.get(changed, "") + "x"
    with pytest.raises(relay.RelayRefused, match="not signed with this deployment's secret"):
        relay.verify(signed(), SECRET, method, path, relay.headers_digest(headers))


def test_the_relay_header_itself_is_not_in_the_digest():
    assert relay.headers_digest({**HEADERS, relay.ENVIRON_HEADER: "anything"}) == REQUEST[2]


def test_another_secret_old_headers_extra_hops_and_garbage_are_refused():
    with pytest.raises(relay.RelayRefused, match="not signed"):
        relay.verify(signed(secret=b"other"), SECRET, *REQUEST)
    tampered = signed().replace(".aaaaaa.", ".bbbbbb.").replace(".https.", ".http.")
    with pytest.raises(relay.RelayRefused, match="not signed"):
        relay.verify(tampered, SECRET, *REQUEST)
    with mock.patch.object(relay.time, "time", return_value=time.time() - relay.MAX_AGE - 5):
        old = signed()
    with pytest.raises(relay.RelayRefused, match=r"is 1\d\.\d s old"):
        relay.verify(old, SECRET, *REQUEST)
    for hops in (0, relay.MAX_HOPS + 1):
        with pytest.raises(relay.RelayRefused, match=f"relayed {hops} times"):
            relay.verify(signed(hops), SECRET, *REQUEST)
    with pytest.raises(relay.RelayRefused, match="scheme 'gopher'"):
        relay.verify(signed(scheme="gopher"), SECRET, *REQUEST)
    for garbage in ("", "abc", "1.2", "x.y.1.h.s.mac", "1.2.z.h.s.mac", "1.2.1.h"):
        with pytest.raises(relay.RelayRefused, match="malformed"):
            relay.verify(garbage, SECRET, *REQUEST)


def test_a_request_head_drops_header_values_that_would_split_it():
    head = relay.request_head("GET", "/ws", [("Host", "a"), ("X-Evil", "1\r\nX-Injected: 2")])
    assert head == b"GET /ws HTTP/1.1\r\nHost: a\r\n\r\n"


# -- the relay's copying ---------------------------------------------------------


@pytest.fixture
def upstream():
    """A TCP server that records what it gets and answers on request."""
    got: list[bytes] = []
    conns: list = []

    def handle(sock, _):
        conns.append(sock)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got.append(data)
            if b"PING" in data:
                sock.sendall(b"PONG")
        got.append(b"<EOF>")

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    yield f"http://127.0.0.1:{server.server_port}", got, conns
    server.stop(timeout=1)


def test_a_relay_sends_the_head_then_copies_both_ways_and_ends_with_either_side(upstream):
    url, got, conns = upstream
    client, browser = gevent.socket.socketpair()
    try:
        link = relay.Relay.open(client, url, b"HEAD\r\n\r\n", b"early bytes")
        runner = gevent.spawn(link.run)
        browser.sendall(b"PING")
        assert browser.recv(10) == b"PONG"
        gevent.sleep(0.05)
        assert b"".join(got) == b"HEAD\r\n\r\nearly bytesPING"
        # The host closes: the browser sees end of file, the relay ends.
        conns[0].shutdown(socket.SHUT_RDWR)
        assert browser.recv(10) == b""
        browser.close()
        runner.join(timeout=5)
        assert runner.dead and runner.successful()
        assert (link.sent, link.received) == (4, 4)
    finally:
        client.close()
        browser.close()


def test_a_relay_passes_the_clients_end_on_and_a_stopping_server_ends_it(upstream):
    url, got, _ = upstream
    client, browser = gevent.socket.socketpair()
    link = relay.Relay.open(client, url, b"H", b"")
    runner = gevent.spawn(link.run)
    browser.shutdown(socket.SHUT_WR)
    gevent.sleep(0.1)
    assert got[-1] == b"<EOF>"  # the host saw the client's end
    link.close()
    runner.join(timeout=5)
    assert runner.dead
    client.close()
    browser.close()


def test_a_host_that_refuses_is_gone():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client, browser = gevent.socket.socketpair()
    with pytest.raises(relay.HostGone):
        relay.Relay.open(client, f"http://127.0.0.1:{port}", b"H", b"")
    client.close()
    browser.close()


# -- the registry ----------------------------------------------------------------


@pytest.fixture
def registries(redis_server, monkeypatch):  # noqa: F811
    # Each test calls the registry from one greenlet: blocking sockets do.
    monkeypatch.setattr(registry.gevent.monkey, "is_module_patched", lambda name: True)
    made: list[registry.Registry] = []

    def make(tag: str, host: str, url: str | None = None, secret: bytes = SECRET) -> registry.Registry:
        reg = registry.Registry(redis_server.url, "t", url, secret)
        reg.start(tag, host, holds=lambda gone: False)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.stop()


def test_workers_and_hosts_are_found_alive_until_they_leave(registries):
    a1 = registries("aaaaaa000001", "aaaaaa", "http://10.0.0.1:8000")
    registries("aaaaaa000002", "aaaaaa", "http://10.0.0.1:8000")
    b = registries("bbbbbb000001", "bbbbbb", "http://10.0.0.2:8000")
    found = b.lookup("aaaaaa000001", "aaaaaa", 0)
    assert (found.alive, found.url, found.host_alive, found.host_url) == (True, "http://10.0.0.1:8000", True,
                                                                         "http://10.0.0.1:8000")
    a1.stop()
    # Its host lives on: a relay there lets the host say the worker is gone.
    found = b.lookup("aaaaaa000001", "aaaaaa", 0)
    assert (found.alive, found.url, found.host_alive, found.host_url) == (False, None, True, "http://10.0.0.1:8000")
    assert b.lookup("cccccc000001", "cccccc", 0) == registry.Entry(False, None, False, None, None, None)


def test_a_lookup_names_the_live_heir_of_the_bucket(registries):
    a = registries("aaaaaa000001", "aaaaaa", "http://10.0.0.1:8000")
    b = registries("bbbbbb000001", "bbbbbb", "http://10.0.0.2:8000")
    assert b.lookup("dddddd000001", "dddddd", 5).heir is None
    a.claim_heir("dddddd000001", 5)
    found = b.lookup("dddddd000001", "dddddd", 5)
    assert (found.heir, found.heir_url) == ("aaaaaa000001", "http://10.0.0.1:8000")
    assert b.lookup("dddddd000001", "dddddd", 6).heir is None
    a.stop()  # a gone heir is no heir
    assert b.lookup("dddddd000001", "dddddd", 5).heir is None


def test_a_claim_that_a_restarted_redis_lost_is_made_again(registries, redis_server):  # noqa: F811
    a = registries("aaaaaa000001", "aaaaaa")
    a.claim_heir("dddddd000001", 1)
    redis_server.client().flushall()
    a.refresh()
    assert redis_server.client().get("t:heir:dddddd000001:1") == b"aaaaaa000001"
    assert redis_server.client().exists("t:worker:aaaaaa000001", "t:host:aaaaaa") == 2


def test_one_heir_per_gone_worker_and_bucket_replaced_only_when_gone(registries):
    a = registries("aaaaaa000001", "aaaaaa")
    b = registries("bbbbbb000001", "bbbbbb")
    assert a.claim_heir("dddddd000001", 3) == "aaaaaa000001"
    assert b.claim_heir("dddddd000001", 3) == "aaaaaa000001"  # a lives: it stays the heir
    assert b.claim_heir("dddddd000001", 4) == "bbbbbb000001"  # another bucket
    # b found a's hand-over socket gone before its entry expired.
    assert b.claim_heir("dddddd000001", 3, instead_of="aaaaaa000001") == "bbbbbb000001"
    # a, back from a pause, does not extend a claim that is no longer its own.
    assert a.stats()["heir_claims_held"] == 1
    a.refresh()
    assert a.stats()["heir_claims_held"] == 0
    assert a.claim_heir("dddddd000001", 3) == "bbbbbb000001"
    b.stop()  # gone: its entry is deleted
    assert a.claim_heir("dddddd000001", 3) == "aaaaaa000001"


def test_claims_of_sessions_no_longer_held_expire(registries, redis_server):  # noqa: F811
    a = registries("aaaaaa000001", "aaaaaa")
    a.claim_heir("dddddd000001", 0)
    key = "t:heir:dddddd000001:0"
    assert 0 < redis_server.client().ttl(key) <= registry.HEIR_TTL
    with mock.patch.object(registry.time, "monotonic", return_value=time.monotonic() + registry.HEIR_GRACE + 1):
        a.refresh()
    assert a.stats()["heir_claims_held"] == 0


def test_redis_down_is_told_at_once_and_recovery_is_found(registries, redis_server, caplog):  # noqa: F811
    b = registries("bbbbbb000001", "bbbbbb")
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="flask_docsync.registry")
    with pytest.raises(registry.RegistryUnavailable):
        b.lookup("aaaaaa000001", "aaaaaa")
    began = time.monotonic()
    for _ in range(50):  # within the back-off nothing waits for Redis
        with pytest.raises(registry.RegistryUnavailable):
            b.lookup("aaaaaa000001", "aaaaaa")
    assert time.monotonic() - began < 0.2
    assert b.stats()["available"] is False
    assert sum("cannot be reached" in r.getMessage() for r in caplog.records) == 1
    redis_server.start()
    time.sleep(registry.BACKOFF + 0.1)
    assert not b.lookup("aaaaaa000001", "aaaaaa").alive
    assert b.stats()["available"] is True
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_an_entry_not_signed_with_the_secret_is_taken_for_absent(registries, redis_server, caplog):  # noqa: F811
    registries("aaaaaa000001", "aaaaaa", "http://10.0.0.1:8000", secret=b"another deployment")
    b = registries("bbbbbb000001", "bbbbbb", "http://10.0.0.2:8000")
    caplog.set_level(logging.WARNING, logger="flask_docsync.registry")
    assert b.lookup("aaaaaa000001", "aaaaaa", 0) == registry.Entry(False, None, False, None, None, None)
    # Nor can whoever writes to the Redis send relays elsewhere.
    redis_server.client().set("t:worker:cccccc000001", '{"url": "http://evil:80", "mac": "00"}')
    assert not b.lookup("cccccc000001", "cccccc", 0).alive
    assert b.stats()["forged_entries"] == 3
    assert any("not signed with this deployment's secret" in r.getMessage() for r in caplog.records)


def test_without_monkey_patching_the_registry_stays_off(redis_server, caplog):  # noqa: F811
    reg = registry.Registry(redis_server.url, "t", None, SECRET)
    caplog.set_level(logging.WARNING, logger="flask_docsync.registry")
    reg.start("aaaaaa000001", "aaaaaa", holds=lambda gone: False)
    assert not reg.enabled and reg.stats()["off"]
    assert redis_server.client().keys("t:*") == []
    assert any("needs gevent's monkey-patching" in r.getMessage() for r in caplog.records)


def test_while_redis_is_down_only_one_call_at_a_time_waits_for_it(registries, redis_server):  # noqa: F811
    b = registries("bbbbbb000001", "bbbbbb")
    redis_server.stop()
    with pytest.raises(registry.RegistryUnavailable):
        b.lookup("aaaaaa000001", "aaaaaa")
    # A failure that took long still leaves its whole back-off (from when it ended).
    assert b._down_until - time.monotonic() > registry.BACKOFF - 0.5
    b._down_until = 0  # the back-off is over: the next call probes ...
    b._probing = True  # ... and while one probes, the others do not wait
    began = time.monotonic()
    with pytest.raises(registry.RegistryUnavailable, match="a moment ago"):
        b.lookup("aaaaaa000001", "aaaaaa")
    assert time.monotonic() - began < 0.05
    redis_server.start()
