"""Who may use the triage API: a bearer token (API clients, Prometheus) or HTTP basic credentials (browsers).

Credentials are compared in constant time. With none configured every request is refused (401), unless
``api_allow_local_unauthenticated`` is set (the demo) and the client connects from a loopback address. The
client address is the socket's peer (proxy headers are not trusted): behind a local reverse proxy every
client would look local, so that setting is for the demo only. A loopback request is let in only when it names
the node by a loopback name (its Host header ``localhost``, ``127.0.0.1`` or ``[::1]``): a web page that points
its own domain at 127.0.0.1 (DNS rebinding) would otherwise read the worklist from the user's browser.

Password guessing is slowed per client address: after ``api_max_failed_logins`` wrong credentials within
``api_lockout_seconds`` that address is answered 429 (with Retry-After), its credentials unchecked, until the
window has passed since its last failure. A success clears the address's count.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from fastapi import HTTPException, Request

from dicom_node.settings import Settings

log = logging.getLogger(__name__)

REALM = "mammo-node"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def _equal(given: str, expected: str) -> bool:
    return secrets.compare_digest(given.encode(), expected.encode())


def is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def names_loopback(host_header: str) -> bool:
    """Whether a Host header (``name[:port]``) names this machine's loopback interface."""
    name = host_header.strip().lower()
    if name.startswith("["):  # [IPv6 address]:port
        name = name[:name.find("]") + 1]
    elif name.count(":") == 1:  # name:port
        name = name.partition(":")[0]
    return name in LOOPBACK_NAMES


class FailedLoginThrottle:
    """Counts wrong credentials per client address and locks an address out after too many.

    An address's failures are forgotten ``window`` seconds after its last one. At most ``max_clients``
    addresses are remembered (the least recently failed are dropped first), so a flood of addresses cannot
    grow memory without bound.
    """

    def __init__(self, max_failures: int, window: float, max_clients: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures, self.window, self.max_clients, self.clock = max_failures, window, max_clients, clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (count, last failure)
        self._lock = threading.Lock()

    def locked_for(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: it may now)."""
        with self._lock:
            count, last = self._current(client)
            return max(0.0, last + self.window - self.clock()) if count >= self.max_failures else 0.0

    def failed(self, client: str) -> bool:
        """Record a wrong credential; True when this failure locks the client out."""
        with self._lock:
            count = self._current(client)[0] + 1
            self._failures[client] = (count, self.clock())
            self._failures.move_to_end(client)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
            return count == self.max_failures

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _current(self, client: str) -> tuple[int, float]:
        count, last = self._failures.get(client, (0, 0.0))
        if count and self.clock() - last >= self.window:
            del self._failures[client]
            return 0, 0.0
        return count, last


class Authenticator:
    """A FastAPI dependency that lets a request through, or raises 401 (or 429 to a locked-out client)."""

    def __init__(self, settings: Settings) -> None:
        self.token = settings.api_token or None
        basic = settings.api_basic_user and settings.api_basic_password
        self.basic = (settings.api_basic_user, settings.api_basic_password) if basic else None
        self.allow_local = settings.api_allow_local_unauthenticated
        self.challenge = f'Basic realm="{REALM}", charset="UTF-8"' if self.basic else f'Bearer realm="{REALM}"'
        self.throttle = FailedLoginThrottle(settings.api_max_failed_logins, settings.api_lockout_seconds)
        if not (self.token or self.basic or self.allow_local):
            log.warning("the triage API has no credentials configured (api_token, api_basic_user/password): "
                        "it refuses every request but /healthz")

    def __call__(self, request: Request) -> None:
        host = request.client.host if request.client else None
        host_header = request.headers.get("host", "")
        if self.allow_local and is_loopback(host) and names_loopback(host_header):
            return  # the demo's local access: before the lockout, which a hostile page could trip for 127.0.0.1
        client = host or "unknown"
        wait = self.throttle.locked_for(client)
        if wait:
            raise HTTPException(429, "too many wrong credentials from this address; try again later",
                                headers={"Retry-After": str(math.ceil(wait))})
        authorization = request.headers.get("authorization", "")
        if self.allowed(authorization, host, host_header):
            if authorization:
                self.throttle.succeeded(client)
            return
        log.info("triage API request refused: no valid credentials (client %s)", client)
        if authorization and self.throttle.failed(client):
            log.warning("triage API: client %s locked out for %.0f s after %d wrong credentials", client,
                        self.throttle.window, self.throttle.max_failures)
        raise HTTPException(401, "valid credentials required", headers={"WWW-Authenticate": self.challenge})

    def allowed(self, authorization: str, client_host: str | None, host_header: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if self.token and scheme == "bearer" and _equal(value, self.token):
            return True
        if self.basic and scheme == "basic" and self._basic(value):
            return True
        return self.allow_local and is_loopback(client_host) and names_loopback(host_header)

    def _basic(self, value: str) -> bool:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user_ok = _equal(user, self.basic[0])
        password_ok = _equal(password, self.basic[1])  # both compared, whatever the user check gave
        return user_ok and password_ok
