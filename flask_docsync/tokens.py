"""Session ids, session tokens and origin checks, on top of ``bokeh.util.token``.

BokehJS decodes the token itself, so its format is Bokeh's. Bokeh's helpers
bind the secret key and signing flag when first imported; every call here
passes them explicitly.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
import zlib
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from bokeh.server.util import check_allowlist
from bokeh.util.token import (
    _TOKEN_ZLIB_KEY,
    _base64_decode,
    _BytesDecoder,
    _get_random_string,
    _signature,
    check_session_id_signature,
    check_token_signature,
    generate_jwt_token,
    generate_session_id,
    get_session_id,
)
from werkzeug.wsgi import host_is_trusted

from .config import TOKEN_SIZE_WARNING, Settings
from .errors import TokenError

log = logging.getLogger(__name__)

#: Separates the random part of a session id from its owner's tag. Not in
#: Bokeh's alphabet for the random part, and not a ``.``, which separates
#: the signature.
OWNER_SEPARATOR = "-"


def owner_tag(session_id: str) -> str | None:
    """The owner tag written into a session id by :meth:`TokenPolicy.new_session_id`; ``None`` if it has none.

    Only meaningful for an id whose signature has been checked.
    """
    base = session_id.partition(".")[0]
    random_part, sep, tag = base.rpartition(OWNER_SEPARATOR)
    return tag if sep and random_part and tag.isalnum() else None


#: Largest inflated token payload accepted. Real tokens carry query
#: arguments and selected headers, and travel in an HTTP header that
#: proxies cap at 8 KB.
MAX_TOKEN_PAYLOAD = 1 << 20


def _select(items: Mapping[str, str], include: tuple[str, ...] | None,
            exclude: tuple[str, ...] | None) -> dict[str, str]:
    if exclude:
        lowered = {e.lower() for e in exclude}
        return {k: v for k, v in items.items() if k.lower() not in lowered}
    if not include:
        return {}
    if "*" in include:
        return dict(items)
    lowered = {i.lower() for i in include}
    return {k: v for k, v in items.items() if k.lower() in lowered}


class TokenPolicy:
    """Makes and checks session ids and tokens under one app's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._secret = settings.secret_key_bytes
        self._signed = settings.signed
        self._warned_size = False

    @property
    def signed(self) -> bool:
        return self._signed

    def new_session_id(self, owner: str | None = None) -> str:
        """A new random session id, signed when signing is on.

        :param owner: The tag of the worker that will hold the session,
            written into the signed part of the id (``<random>-<tag>.<signature>``)
            so that any worker can tell where the session lives and no client
            can change it. ``None``, or without signing, gives Bokeh's plain id.
        """
        if owner is None or not self._signed:
            return generate_session_id(secret_key=self._secret, signed=self._signed)
        base = f"{_get_random_string(secret_key=self._secret)}{OWNER_SEPARATOR}{owner}"
        return f"{base}.{_signature(base, self._secret)}"

    def check_session_id(self, session_id: str) -> None:
        """Refuse an id a client brought that this server did not sign."""
        if not session_id:
            raise TokenError("The session id is empty.")
        if not check_session_id_signature(session_id, secret_key=self._secret, signed=self._signed):
            raise TokenError("Invalid token or session ID: the session id is not signed with this server's key.")

    def make_token(
        self,
        session_id: str,
        arguments: Mapping[str, list[bytes]],
        headers: Mapping[str, str],
        cookies: Mapping[str, str],
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A token for ``session_id`` carrying what another worker needs to rebuild the request.

        Query arguments are always carried; headers and cookies only as the
        include/exclude settings say.
        """
        s = self.settings
        carried_cookies = _select(cookies, s.include_cookies, s.exclude_cookies)
        carried_headers = _select(headers, s.include_headers, s.exclude_headers)
        if carried_cookies and not any(
            h.lower() == "cookie" for h in (s.include_headers or ())
        ):
            # The cookies travel on their own; a copy in the headers would double the size.
            carried_headers = {k: v for k, v in carried_headers.items() if k.lower() != "cookie"}
        payload: dict[str, Any] = {
            "arguments": {k: list(v) for k, v in arguments.items()},
            "headers": carried_headers,
            "cookies": carried_cookies,
        }
        if extra:
            payload.update(extra)
        token = generate_jwt_token(
            session_id,
            secret_key=self._secret,
            signed=self._signed,
            expiration=s.session_token_expiration,
            extra_payload=payload,
        )
        if len(token) > TOKEN_SIZE_WARNING and not self._warned_size:
            self._warned_size = True
            log.warning(
                "Session tokens are %d bytes; proxies commonly refuse headers over 8 KB and"
                " the token travels in one. Carry fewer headers/cookies"
                " (DOCSYNC_INCLUDE_HEADERS / DOCSYNC_INCLUDE_COOKIES).", len(token),
            )
        return token

    def decode(self, token: str) -> tuple[str, dict[str, Any]]:
        """Check a token's form and signature; return its session id and payload.

        Expiry is not checked here: see :meth:`check_expiry`.

        :raises TokenError: naming what is wrong.
        """
        if not token:
            raise TokenError("No session token was given (expected as the second WebSocket subprotocol).")
        try:
            session_id = get_session_id(token)
        except Exception:
            raise TokenError("The session token is malformed.") from None
        if not session_id:
            raise TokenError("The session token is malformed.")
        # The signature first: the payload may be zlib-compressed, and a
        # forged token must not make the server inflate anything.
        try:
            valid = check_token_signature(token, secret_key=self._secret, signed=self._signed)
        except Exception:
            valid = False
        if not valid:
            raise TokenError("Invalid token or session ID: the signature does not match this server's key.")
        try:
            payload = _token_payload(token)
        except TokenError:
            raise
        except Exception:
            raise TokenError("The session token is malformed.") from None
        if not isinstance(payload, dict):
            raise TokenError("The session token is malformed.")
        if "session_expiry" not in payload:
            raise TokenError("The session token has no expiry.")
        return session_id, payload

    @staticmethod
    def check_expiry(payload: Mapping[str, Any]) -> None:
        """Refuse a token past its expiry; only checked when a session is created."""
        try:
            expiry = float(payload["session_expiry"])
        except (KeyError, TypeError, ValueError):
            raise TokenError("The session token has no valid expiry.") from None
        if time.time() >= expiry:
            raise TokenError(
                "Token is expired. Reload the page for a new one, or raise"
                " --session-token-expiration (DOCSYNC_SESSION_TOKEN_EXPIRATION)."
            )


def _token_payload(token: str) -> dict[str, Any]:
    """``bokeh.util.token.get_token_payload`` with a bound on the inflated size.

    Bokeh inflates the zlib part of a token without a limit: 60 KB of header
    would become tens of MB.
    """
    decoded = json.loads(_base64_decode(token.split(".")[0]))
    if not isinstance(decoded, dict):
        raise ValueError("not a JSON object")
    packed = decoded.pop(_TOKEN_ZLIB_KEY, None)
    if packed is not None:
        inflater = zlib.decompressobj()
        data = inflater.decompress(_base64_decode(packed), MAX_TOKEN_PAYLOAD)
        if inflater.unconsumed_tail or not inflater.eof:
            raise TokenError(f"The session token's payload is over {MAX_TOKEN_PAYLOAD} bytes or truncated.")
        decoded.update(json.loads(data, cls=_BytesDecoder))
    decoded.pop("session_id", None)
    return decoded


def _netloc(scheme: str, netloc: str) -> str:
    netloc = netloc.lower()
    if ":" not in netloc.rsplit("]", 1)[-1]:
        netloc += ":443" if scheme in ("https", "wss") else ":80"
    return netloc


def _allowlist_netloc(netloc: str) -> str:
    """``netloc`` as Bokeh's allowlist compares it: lower case, ``:80`` without a port."""
    netloc = netloc.lower()
    if ":" not in netloc.rsplit("]", 1)[-1]:
        netloc += ":80"  # what Bokeh assumes for a host without a port, even for https
    return netloc


def _hostname(host: str) -> str:
    """The name or address of a ``Host`` value, without port or IPv6 brackets."""
    host = host.lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a ``Host`` header value) names the browser's own machine.

    ``localhost`` and loopback addresses (``127.0.0.0/8``, ``[::1]``) are the
    names a DNS-rebinding page can never have: its Host is the attacker's
    domain name, whatever address that name resolves to.
    """
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_refusal(
    origin: str | None,
    host: str | None,
    scheme: str,
    allowlist: tuple[str, ...],
    *,
    trusted_hosts: Collection[str] | None = None,
    same_origin_hosts: tuple[str, ...] | None = None,
) -> str | None:
    """Why a WebSocket from ``origin`` must be refused, or ``None`` to let it connect.

    A request without an Origin (non-browser clients such as
    ``bokeh.client``) is allowed, as Bokeh does, and so is an Origin on the
    allowlist (``"*"`` allows any). A page of the serving host itself (the
    Origin equals the ``Host``) is allowed only if that host is one the
    server trusts: after a DNS rebinding, an attacker's page at
    ``evil.example`` reaches this server under the attacker's name and is
    "same origin" too. The trusted hosts are the allowlist's and either

    * ``same_origin_hosts`` when given (``flask-docsync serve`` passes its
      bind address and trusts nothing more), or
    * Flask's ``TRUSTED_HOSTS`` (``trusted_hosts``) and the loopback names
      (see :func:`is_loopback_host`).

    :param host: The request's ``Host`` (``request.host``).
    :param scheme: The request's scheme, for the default port of ``host``.
    :param allowlist: ``DOCSYNC_ALLOW_WEBSOCKET_ORIGIN``, normalized.
    :return: The reason, naming the setting that would allow the origin.
    """
    if not origin:
        return None
    if isinstance(trusted_hosts, str):  # Werkzeug accepts one name as a string too
        trusted_hosts = [trusted_hosts]
    netloc = urlsplit(origin).netloc
    if netloc and ("*" in allowlist or check_allowlist(_allowlist_netloc(netloc), list(allowlist))):
        return None
    if not (host and netloc and _netloc(urlsplit(origin).scheme, netloc) == _netloc(scheme, host)):
        return (
            f"Refusing websocket connection from Origin {origin!r}; allowed origins:"
            f" {', '.join(allowlist) or 'none'} (and pages of this server's trusted hosts)."
            " Add it with --allow-websocket-origin or DOCSYNC_ALLOW_WEBSOCKET_ORIGIN."
        )
    if check_allowlist(_allowlist_netloc(host), list(allowlist)):
        return None
    if same_origin_hosts is not None:
        if check_allowlist(_allowlist_netloc(host), list(same_origin_hosts)):
            return None
        trusted = ", ".join((*allowlist, *same_origin_hosts)) or "none"
        fix = f"start the server with --allow-websocket-origin={host} (or DOCSYNC_ALLOW_WEBSOCKET_ORIGIN)"
    else:
        if is_loopback_host(host) or (trusted_hosts and host_is_trusted(host, trusted_hosts)):
            return None
        names = [*(trusted_hosts or ()), *allowlist]
        trusted = ", ".join(names) if names else (
            "loopback names only, as neither TRUSTED_HOSTS nor DOCSYNC_ALLOW_WEBSOCKET_ORIGIN is set")
        fix = (f"add {_hostname(host)!r} to the app's TRUSTED_HOSTS config"
               f" (or {host!r} to DOCSYNC_ALLOW_WEBSOCKET_ORIGIN)")
    return (
        f"Refusing websocket connection from Origin {origin!r}: the page's own host {host!r} is not"
        f" a trusted host (trusted: {trusted}), so it may be a DNS-rebinding page."
        f" If this site is served under that name, {fix}."
    )

