"""
access.py: what stands between serve.py's app and the network: how long a connection may
take to send its request (read timeouts), which Host names are answered, who may use the
API (keys, page sessions) and how much (rate limits; issue 18).

- Read timeouts: a connection gets --header-timeout seconds for its request line and
  headers and --body-timeout for its body, else it is closed (uvicorn's h11 protocol has
  only a keep-alive timeout, so TimedH11Protocol adds these).

- API keys (--api-key, --api-key-file): /v1/* needs `Authorization: Bearer KEY`, as
  OpenAI's and vLLM's APIs do. Keys are compared in constant time (hmac.compare_digest
  on their SHA-256, every key each time), and a request's identity is the key's hash,
  never the key. Without keys the API is open, as before.
- The page needs no secret: GET / hands the browser a page session, an HttpOnly,
  SameSite=Strict cookie signed with a random per-process secret (a restart ends all
  sessions; the page then shows the 401 and a reload starts a new one). Anyone can load
  the page, so a session is no proof of anything but "came through the page"; what
  bounds its use is the rate limit of its address. Other sites cannot use it: the
  browser does not send a SameSite=Strict cookie with their requests, and /v1/* takes
  only application/json (no CORS preflight is ever granted).
- Whose cache: a request may only reuse KV cache rows of its own identity (its API key,
  or its page session), so a prompt_cache_key never crosses keys.
- /metrics needs a key too when keys are set (a page session is not enough): its figures
  are nobody's secret, but traffic and queue are the operator's business.
- Rate limits (--rate-limit-requests, --rate-limit-tokens, per minute): a token bucket per
  client, that is per API key, else per address. The address is the TCP peer's, or the
  X-Forwarded-For address the nearest trusted proxy (--trusted-proxy) saw: the header is
  believed only from those, else anyone could claim any address (serve.py's Guard applies
  it, with uvicorn's own proxy-header handling off). An IPv6 address counts as its /64
  (rate_address): that is what one home or server is given, so its owner could otherwise take a
  fresh address, and a fresh bucket, for every request. Tokens: a request reserves the most its
  answer can generate (max_tokens, or what the context leaves) when it is admitted, and gets
  back what the answer did not use when it ends (Reservation). A reservation needs a bucket
  above zero and may take it below, so a client overdraws by at most one answer's worth,
  however many answers it runs at once; then it waits until the bucket is positive again.
  Over a limit: 429 with Retry-After (whole seconds).
"""
import hashlib
import hmac
import ipaddress
import math
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

COOKIE = "nanoschnack_session"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def log(text: str) -> None:
    print(f"serve: {text}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Connections: read timeouts, Host names

class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus read timeouts: header_timeout seconds for the request line
    and headers (from the connection's start, or from the first byte of a next request on a
    kept-alive connection), then body_timeout seconds for the body. A connection that sends
    nothing, half its headers or less body than it announced is closed then, instead of
    holding a socket and a coroutine for as long as it likes. (Between requests uvicorn's
    own keep-alive timeout applies.) Subclass it with the values: timed_protocol()."""

    header_timeout = body_timeout = 10.0
    read_timer = reading = None  # the pending timeout and what it is for: "headers", "body" or None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._expect("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track(got_bytes=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track(got_bytes=False)

    def _track(self, got_bytes: bool) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._expect("body" if cycle.more_body else None)  # None: the app is answering
        elif got_bytes or self.conn.trailing_data[0]:
            self._expect("headers")  # part of a next request has come
        else:
            self._expect(None)  # idle between requests: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc):
        self._expect(None)
        super().connection_lost(exc)

    def _expect(self, what: str | None) -> None:
        if what == self.reading:
            return  # the deadline counts from when the wait began, not from the latest bytes
        if self.read_timer is not None:
            self.read_timer.cancel()
        self.reading, self.read_timer = what, None
        if what is not None:
            seconds = self.header_timeout if what == "headers" else self.body_timeout
            self.read_timer = self.loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        if not self.transport.is_closing():
            client = "%s:%d" % self.client if self.client else "?"
            log(f"closed the connection of {client}: its request {self.reading} did not arrive within "
                f"{self.header_timeout if self.reading == 'headers' else self.body_timeout:g} s")
            self.transport.close()
        self.read_timer = self.reading = None


def timed_protocol(header_timeout: float, body_timeout: float) -> type:
    return type("TimedH11Protocol", (TimedH11Protocol,), dict(header_timeout=header_timeout,
                                                             body_timeout=body_timeout))


def host_name(host: str) -> str:
    """A Host header's name without the port: "localhost:8000" -> "localhost", "[::1]:80" -> "[::1]"."""
    host = host.strip().lower()
    return host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.partition(":")[0]


def default_allowed_hosts(bind: str) -> list[str]:
    """What --host implies: loopback names for a loopback address, that address for a specific
    one, and any name ("*") for 0.0.0.0 or ::, where the server cannot know the names it has."""
    if bind in ("0.0.0.0", "::", ""):
        return ["*"]
    if bind in ("127.0.0.1", "localhost", "::1"):
        return list(LOOPBACK_HOSTS)
    return [f"[{bind}]" if ":" in bind else bind]


# -----------------------------------------------------------------------------
# API keys, page sessions, client addresses


class Denied(Exception):
    """No valid API key or page session: serve.py answers 401."""


class RateLimited(Exception):
    """Over a rate limit: serve.py answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Client:
    identity: str | None  # whose cache: "key:<hash>", "page:<session>", or None (no keys configured)
    rate_key: str  # whose rate limit: "key:<hash>" or "addr:<address>" (rate_address: IPv6 by its /64)


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped. utf-8-sig: a byte order mark
    (Windows editors write one) is not part of the first key, which no client could send otherwise."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def rate_address(address: str) -> str:
    """Whose rate limit an address is: an IPv6 address counts as its /64 network, since every IPv6
    home or server gets at least a /64 and can use any address in it (privacy extensions even change
    it on their own), so per address one client would get a fresh bucket for every request. An
    IPv4-mapped IPv6 address (::ffff:192.0.2.1) is its IPv4 address; what is no address stays as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip), 64), strict=False))  # int(): without a %zone
    return str(ip)


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class Bucket:
    """`per_minute` units, refilled continuously; may go negative (tokens reserved beyond what is left)."""

    def __init__(self, per_minute: int, now: float):
        self.per_minute, self.level, self.at = per_minute, float(per_minute), now

    def refill(self, now: float) -> float:
        self.level = min(self.per_minute, self.level + (now - self.at) * self.per_minute / 60)
        self.at = now
        return self.level

    def seconds_until(self, level: float) -> int:
        """Whole seconds until the bucket holds `level` (at least 1)."""
        return max(1, math.ceil((level - self.level) * 60 / self.per_minute))


class Access:
    def __init__(self, api_keys=(), trusted_proxies=(), requests_per_minute: int = 0, tokens_per_minute: int = 0,
                 clock=time.monotonic):
        self.keys = [digest(k) for k in api_keys]
        self.trusted = [ipaddress.ip_network(p.strip(), strict=False) for p in trusted_proxies if p.strip()]
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.clock = clock  # tests freeze it: no test waits for a bucket to refill
        self.secret = secrets.token_bytes(32)  # signs page sessions; new per process
        self.buckets: dict[tuple[str, str], Bucket] = {}
        self.lock = threading.Lock()  # charge() runs in the engine's worker thread

    # -- who is asking ---------------------------------------------------------

    def is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The peer, or, when the peer is a trusted proxy, the address it says it was asked by:
        X-Forwarded-For read from the right, skipping further trusted proxies."""
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop[:64]
        return hops[0][:64] if hops else peer

    def new_session(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._sign(nonce)}"

    def _sign(self, nonce: str) -> str:
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    def session_of(self, cookie: str | None) -> str | None:
        """The session id in a valid page-session cookie, else None."""
        nonce, _, signature = (cookie or "").partition(".")
        if nonce and hmac.compare_digest(signature.encode(), self._sign(nonce).encode()):
            return nonce
        return None

    def identify(self, address: str, authorization: str | None, cookie: str | None, page: bool = True) -> Client:
        """Who a /v1/* request is; Denied without a valid key or page session (when keys are set).
        page=False (/metrics): only a key will do."""
        if not self.keys:
            return Client(None, f"addr:{rate_address(address)}")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            given = digest(token.strip())
            match = False
            for key in self.keys:  # every key, every time: the time taken says nothing about which matched
                match |= hmac.compare_digest(given, key)
            if match:
                name = "key:" + given.hex()[:16]
                return Client(name, name)
            raise Denied("Incorrect API key provided")
        session = self.session_of(cookie) if page else None
        if session is not None:
            return Client(f"page:{session}", f"addr:{rate_address(address)}")
        raise Denied("Missing API key: send it as 'Authorization: Bearer KEY' (this server was started with "
                     "--api-key)" + (", or use the chat page" if page else ""))

    # -- how much ---------------------------------------------------------------

    def _bucket(self, kind: str, rate_key: str, per_minute: int, now: float) -> Bucket:
        bucket = self.buckets.get((kind, rate_key))
        if bucket is None:
            if len(self.buckets) > 100_000:  # forget full buckets: they are as good as new ones
                self.buckets = {k: b for k, b in self.buckets.items() if b.refill(now) < b.per_minute}
            bucket = self.buckets[kind, rate_key] = Bucket(per_minute, now)
        bucket.refill(now)
        return bucket

    def admit(self, client: Client) -> None:
        """Take one request from the client's bucket; RateLimited when it is empty or in token debt
        (checked again, and tokens taken, by reserve() once the request says how many it wants)."""
        with self.lock:
            now = self.clock()
            if self.tokens_per_minute and (debt := self.token_debt(client, now)) is not None:
                raise debt
            if self.requests_per_minute:
                requests = self._bucket("requests", client.rate_key, self.requests_per_minute, now)
                if requests.level < 1:
                    raise RateLimited(f"rate limit reached: {self.requests_per_minute} requests per minute "
                                      f"(--rate-limit-requests)", requests.seconds_until(1))
                requests.level -= 1

    def token_debt(self, client: Client, now: float) -> RateLimited | None:
        tokens = self._bucket("tokens", client.rate_key, self.tokens_per_minute, now)
        if tokens.level <= 0:
            return RateLimited(f"rate limit reached: {self.tokens_per_minute} generated tokens per minute "
                               f"(--rate-limit-tokens)", tokens.seconds_until(1))
        return None

    def reserve(self, client: Client, tokens: int) -> "Reservation":
        """Take the most an answer can generate from the client's token bucket, if it is above zero
        (RateLimited otherwise); the Reservation gives back what the answer leaves unused."""
        with self.lock:
            if self.tokens_per_minute:
                debt = self.token_debt(client, self.clock())
                if debt is not None:
                    raise debt
                self.buckets["tokens", client.rate_key].level -= tokens
        return Reservation(self, client, tokens if self.tokens_per_minute else 0)

    def give_back(self, client: Client, tokens: int) -> None:
        if self.tokens_per_minute and tokens:
            with self.lock:
                bucket = self._bucket("tokens", client.rate_key, self.tokens_per_minute, self.clock())
                bucket.level = min(bucket.per_minute, bucket.level + tokens)


class Reservation:
    """Tokens taken from a client's bucket for one answer. settle(used) gives back the rest, once: the
    first call counts (the engine's on_finish with the tokens generated, else the job's last event with 0)."""

    def __init__(self, access: Access, client: Client, tokens: int):
        self.access, self.client, self.tokens = access, client, tokens
        self.settled = False

    def split(self, n: int) -> list["Reservation"]:
        """This reservation as n, one for each answer of a request that asks for n (OpenAI's n), each settled
        on its own; this one then gives back nothing itself."""
        self.settled = True
        return [Reservation(self.access, self.client, self.tokens // n + (i < self.tokens % n)) for i in range(n)]

    def settle(self, used: int = 0) -> None:
        with self.access.lock:  # the engine's thread and the event loop may both settle
            if self.settled:
                return
            self.settled = True
        self.access.give_back(self.client, self.tokens - used)
