"""Sending webhook deliveries (Standard Webhooks, https://www.standardwebhooks.com/).

A thread in every API process (beside the reconciler) claims due deliveries from the outbox
(db/webhooks.py; several processes share the work with SKIP LOCKED), signs and sends each,
and records the attempt. The receiver's host is resolved at send time and the connection
goes to the address that was checked, so DNS cannot point an accepted name at a private
address after the check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from convoy.settings import Settings
from db import webhooks
from db.session import session_scope

log = logging.getLogger(__name__)

# The spec's retry schedule after the first attempt: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
SCHEDULE_SECONDS = (5, 300, 1800, 7200, 18000, 36000, 36000)
RESPONSE_KEEP_CHARS = 1000
SENDERS = 4  # receivers answered at once per API process


class Refused(ValueError):
    """The URL may not be sent to (its host resolves to a private address, or no address)."""


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with the secret's bytes."""
    key = base64.b64decode(secret.removeprefix(webhooks.SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def forbidden(address: str) -> str | None:
    """Why a webhook may not go to this IP address (None: a public address)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):  # an IPv4 address inside: judged as that one
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    for what, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("private", ip.is_private), ("multicast", ip.is_multicast),
                       ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved)):
        if flag:
            return f"{address} is a {what} address"
    if not ip.is_global:
        return f"{address} is not a public address"
    return None


# what inet_aton reads as an IPv4 address besides the dotted quad: 2130706433, 0x7f000001,
# 017700000001, 127.1, 0 (resolvers and HTTP clients accept these forms too)
LOOSE_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


def literal_address(host: str) -> str | None:
    """The IP address a URL's host names without any lookup: an IP literal, an IPv4 address
    in decimal, octal, hex or short form, or a `localhost` name (RFC 6761: always
    loopback); None for a name that must be resolved."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if LOOSE_IPV4.match(host):
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "127.0.0.1"
    return None


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL without credentials; ValueError otherwise."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise ValueError(f"url: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("url: only http and https URLs are sent to")
    if parts.username is not None or parts.password is not None:
        raise ValueError("url: credentials in the URL are not accepted")
    if not parts.hostname:
        raise ValueError("url: no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("url: the port is not a number from 0 to 65535") from None
    return parts.scheme, parts.hostname, port


def resolve(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to: the first the host resolves to, each checked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"host {host!r} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise Refused(f"host {host!r} has no address")
    if not allow_private:
        for address in addresses:  # every one: the client could pick any
            reason = forbidden(address)
            if reason:
                raise Refused(f"host {host!r} resolves to {reason} (set "
                              "CONVOY_WEBHOOK_ALLOW_PRIVATE=true to allow it)")
    return addresses[0]


@dataclass(frozen=True)
class Sent:
    status: int | None
    response: str | None
    error: str | None
    seconds: float


def send(delivery: webhooks.Claimed, settings: Settings, *, now: float | None = None) -> Sent:
    """One attempt: resolve and check the host, connect to that address, POST the signed
    body; redirects are not followed (a 3xx is a failed attempt)."""
    t0 = time.monotonic()
    try:
        scheme, host, port = check_url(delivery.url)
        address = resolve(host, port, allow_private=settings.webhook_allow_private)
    except (Refused, ValueError) as exc:
        return Sent(None, None, f"refused: {exc}", time.monotonic() - t0)
    parts = urlsplit(delivery.url)
    netloc = f"[{address}]" if ":" in address else address
    target = parts._replace(netloc=f"{netloc}:{port}").geturl()
    timestamp = int(now if now is not None else time.time())
    default_port = port == (443 if scheme == "https" else 80)
    authority = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
    headers = {
        "host": authority if default_port else f"{authority}:{port}",
        "content-type": "application/json",
        "user-agent": "Convoy-Webhooks/1",
        "webhook-id": delivery.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(delivery.secret, delivery.id, timestamp, delivery.body),
    }
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    try:
        with httpx.Client(follow_redirects=False, timeout=settings.webhook_timeout_seconds,
                          trust_env=False) as client:
            response = client.post(target, content=delivery.body.encode(), headers=headers,
                                   extensions=extensions)
    except httpx.TimeoutException:
        return Sent(None, None, f"timed out after {settings.webhook_timeout_seconds:g} s",
                    time.monotonic() - t0)
    except httpx.HTTPError as exc:
        return Sent(None, None, f"{type(exc).__name__}: {exc}"[:RESPONSE_KEEP_CHARS],
                    time.monotonic() - t0)
    text = response.text[:RESPONSE_KEEP_CHARS]
    error = None
    if response.is_redirect:
        error = f"redirect to {response.headers.get('location', '?')[:200]} (not followed)"
    elif not response.is_success:
        error = f"HTTP {response.status_code}"
    return Sent(response.status_code, text, error, time.monotonic() - t0)


def retry_after(settings: Settings, attempts_before: int) -> float | None:
    """Seconds until the next try after attempt `attempts_before + 1` failed; None when the
    schedule is spent."""
    if attempts_before >= len(SCHEDULE_SECONDS):
        return None
    return SCHEDULE_SECONDS[attempts_before] * settings.webhook_retry_scale


def deliver_once(settings: Settings, delivery: webhooks.Claimed) -> str:
    """Send one claimed delivery and record the attempt; returns the delivery's state."""
    sent = send(delivery, settings)
    try:
        with session_scope(settings.database_url) as session:
            state = webhooks.record_attempt(
                session, delivery=delivery, status=sent.status, response=sent.response,
                error=sent.error, duration_seconds=sent.seconds,
                retry_after_seconds=retry_after(settings, delivery.attempts))
    except Exception:  # the endpoint was deleted meanwhile, or the database is away:
        # unrecorded, the delivery comes due again when its claim runs out
        log.warning("recording webhook %s failed", delivery.id, exc_info=True)
        return "unrecorded"
    if sent.error:
        log.info("webhook %s to endpoint %s: %s (now %s)", delivery.id, delivery.endpoint_id,
                 sent.error, state)
    return state


def pass_once(settings: Settings, pool: ThreadPoolExecutor | None = None) -> int:
    """Claim the due deliveries and send them; returns how many were sent."""
    hold = settings.webhook_timeout_seconds + 30
    with session_scope(settings.database_url) as session:
        claimed = webhooks.claim_due(session, limit=2 * SENDERS, hold_seconds=hold)
    if pool is None:
        for delivery in claimed:
            deliver_once(settings, delivery)
    else:
        list(pool.map(lambda d: deliver_once(settings, d), claimed))
    return len(claimed)


class Sender:
    """The sending loop: a thread in each API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.webhook_timeout_seconds + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = pass_once(self.settings, self._pool)
            except Exception:  # the database is down: next time
                log.warning("webhook pass failed", exc_info=True)
                busy = 0
            if not busy:
                self._stop.wait(self.settings.webhook_poll_seconds)
