"""Access control (issue 18): API keys on /v1/*, the page's session, cache reuse scoped by key,
per-client rate limits with 429 + Retry-After, and X-Forwarded-For believed only from trusted
proxies. The rate limiter's clock is frozen by the tests: nothing waits for a bucket to refill.
Issue 29, on a real `python serve.py` without --trusted-proxy: forged X-Forwarded-For headers
neither get fresh rate-limit buckets nor reach the access log; /metrics needs the key; every
response is counted and carries nosniff. And concurrent answers cannot overdraw the token limit."""
import json
import math

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")

import access
from conftest import make_checkpoint
from test_serve import QUESTIONS, Server, Stream, chat_body, request, wait_for
from test_serve_live import Hold, LiveServer

KEYS = ["sk-erster-schluessel", "sk-zweiter-schluessel"]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, small_tokenizer):
    """serve.create_app with two API keys, 127.0.0.1 as a trusted proxy and a frozen clock."""
    folder = tmp_path_factory.mktemp("serve_access")
    clock = Clock()
    gate = access.Access(KEYS, ["127.0.0.1"], clock=clock)
    server = LiveServer(make_checkpoint(folder, small_tokenizer, kind="chat", sequence_len=512), access=gate)
    server.access, server.clock = gate, clock
    yield server
    server.stop()


@pytest.fixture
def limits(guarded):
    """Set rate limits for one test; fresh buckets before and after."""
    def set_limits(requests=0, tokens=0):
        guarded.access.requests_per_minute, guarded.access.tokens_per_minute = requests, tokens
        guarded.access.buckets.clear()
    yield set_limits
    set_limits()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def post(server, body, headers=None):
    return request(server.url, "POST", "/v1/chat/completions", body, headers)


def test_api_key_is_required_on_v1_only(guarded):
    for headers in ({}, bearer("sk-falsch"), {"Authorization": KEYS[0]}, {"Authorization": "Basic " + KEYS[0]}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            status, head, answer = request(guarded.url, method, path, chat_body(QUESTIONS[0], max_tokens=2)
                                           if method == "POST" else None, headers)
            assert status == 401 and head["WWW-Authenticate"] == "Bearer", (headers, path, answer)
            assert answer["error"]["code"] == "invalid_api_key" and answer["error"]["type"] == "invalid_request_error"
            assert set(answer["error"]) == {"message", "type", "param", "code"}
    for key in KEYS:
        assert request(guarded.url, "GET", "/v1/models", headers=bearer(key))[0] == 200
        status, _, answer = post(guarded, chat_body(QUESTIONS[0], max_tokens=3), bearer(key))
        assert status == 200 and answer["usage"]["completion_tokens"] > 0, answer
    assert request(guarded.url, "GET", "/health")[0] == 200  # the page and /health stay open
    assert request(guarded.url, "GET", "/")[0] == 200


def test_official_client_sends_the_key(guarded):
    openai = pytest.importorskip("openai", reason="the official openai client is not installed")
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEYS[1], max_retries=0)
    assert [m.id for m in good.models.list()] == ["nanoschnack"]
    bad = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sk-falsch", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_the_page_chats_with_its_session_not_a_key(guarded):
    status, head, _ = request(guarded.url, "GET", "/")
    cookie = head["Set-Cookie"]
    attributes = {a.strip().lower() for a in cookie.split(";")}
    assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
    session = cookie.split(";")[0]
    assert session.startswith(access.COOKIE + "=")
    status, _, answer = post(guarded, chat_body(QUESTIONS[1], max_tokens=3), {"Cookie": session})
    assert status == 200, answer
    forged = session[:-4] + ("0000" if not session.endswith("0000") else "1111")  # a changed signature
    for cookie in (forged, f"{access.COOKIE}=abc", f"{access.COOKIE}=abc.def"):
        assert post(guarded, chat_body(QUESTIONS[1], max_tokens=3), {"Cookie": cookie})[0] == 401, cookie
    # a browser that has a session gets no new one
    assert "Set-Cookie" not in request(guarded.url, "GET", "/", headers={"Cookie": session})[1]


def test_cache_reuse_never_crosses_api_keys(guarded):
    """The same prompt_cache_key under another key starts from scratch; under the same key it reuses."""
    cached = lambda answer: answer["usage"]["prompt_tokens_details"]["cached_tokens"]
    first = [{"role": "system", "content": "Das Passwort ist Kuckucksuhr."}, {"role": "user", "content": "Hallo"}]
    body = lambda messages: {**chat_body(""), "messages": messages, "max_tokens": 8, "prompt_cache_key": "chat-1"}
    status, _, a1 = post(guarded, body(first), bearer(KEYS[0]))
    assert status == 200, a1
    second = first + [{"role": "assistant", "content": a1["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "Und?"}]
    other = post(guarded, body(second), bearer(KEYS[1]))[2]
    assert cached(other) == 0, other["usage"]
    mine = post(guarded, body(second), bearer(KEYS[0]))[2]
    assert cached(mine) >= a1["usage"]["prompt_tokens"] - 1, mine["usage"]


def test_request_rate_limit_per_key(guarded, limits):
    limits(requests=2)
    for _ in range(2):
        assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), bearer(KEYS[0]))[0] == 200
    status, head, answer = post(guarded, chat_body(QUESTIONS[0], max_tokens=2), bearer(KEYS[0]))
    assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded", answer
    assert answer["error"]["type"] == "rate_limit_error" and "2 requests per minute" in answer["error"]["message"]
    assert head["Retry-After"] == "30"  # 2 per minute: the next one in 30 s
    assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), bearer(KEYS[1]))[0] == 200  # another client
    guarded.clock.now += 30
    assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), bearer(KEYS[0]))[0] == 200
    assert guarded.engine.counts["rejected"] == 0  # rate limits are not the queue's


def test_token_rate_limit_counts_generated_tokens(guarded, limits):
    limits(tokens=10)
    status, _, answer = post(guarded, chat_body(QUESTIONS[2], max_tokens=24), bearer(KEYS[0]))
    assert status == 200
    used = answer["usage"]["completion_tokens"]
    assert used > 10, answer["usage"]  # an answer may overdraw once...
    status, head, answer = post(guarded, chat_body(QUESTIONS[2], max_tokens=2), bearer(KEYS[0]))
    assert status == 429 and "10 generated tokens per minute" in answer["error"]["message"], answer
    assert head["Retry-After"] == str(math.ceil((1 - (10 - used)) * 60 / 10))  # ...then waits until it is repaid
    guarded.clock.now += int(head["Retry-After"])
    assert post(guarded, chat_body(QUESTIONS[2], max_tokens=2), bearer(KEYS[0]))[0] == 200


def test_forwarded_for_is_believed_from_trusted_proxies_only(guarded, limits):
    """127.0.0.1 is a trusted proxy here: page sessions are limited per forwarded address."""
    limits(requests=1)
    session = request(guarded.url, "GET", "/")[1]["Set-Cookie"].split(";")[0]
    as_client = lambda address: {"Cookie": session, "X-Forwarded-For": f"203.0.113.9, {address}"}
    assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), as_client("198.51.100.1"))[0] == 200
    assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), as_client("198.51.100.2"))[0] == 200
    assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), as_client("198.51.100.1"))[0] == 429
    gate = access.Access(trusted_proxies=["10.0.0.0/8"])
    assert gate.client_address("192.0.2.7", "198.51.100.1") == "192.0.2.7"  # not a proxy: the header is a claim
    assert gate.client_address("10.1.2.3", "198.51.100.1, 10.9.9.9") == "198.51.100.1"  # proxies chained
    assert gate.client_address("10.1.2.3", "1.1.1.1, 198.51.100.1") == "198.51.100.1"  # the client's own claim is ignored
    assert gate.client_address("10.1.2.3", None) == "10.1.2.3"


def test_an_ipv6_client_is_limited_by_its_64(guarded, limits):
    """Every IPv6 home or server has at least a /64 and may send each request from another address in it:
    those requests share one bucket (they each had their own). An IPv4-mapped address is its IPv4 address."""
    limits(requests=2)
    session = request(guarded.url, "GET", "/")[1]["Set-Cookie"].split(";")[0]
    as_client = lambda address: {"Cookie": session, "X-Forwarded-For": address}
    statuses = [post(guarded, chat_body(QUESTIONS[0], max_tokens=2), as_client(f"2001:db8:1:2::{i}"))[0]
                for i in range(1, 4)]
    assert statuses == [200, 200, 429]
    assert post(guarded, chat_body(QUESTIONS[0], max_tokens=2), as_client("2001:db8:1:3::1"))[0] == 200  # another /64
    gate = access.Access()
    rate_key = lambda address: gate.identify(address, None, None).rate_key
    assert rate_key("2001:db8:1:2:aaaa::1") == rate_key("2001:DB8:1:2::FFFF") == "addr:2001:db8:1:2::/64"
    assert rate_key("::ffff:192.0.2.1") == rate_key("192.0.2.1") == "addr:192.0.2.1"
    assert rate_key("fe80::1%eth0") == "addr:fe80::/64" and rate_key("?") == "addr:?"


def test_key_file_and_flags(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# Schlüssel\nsk-a\n\n  sk-b  \n", encoding="utf-8")
    assert access.read_key_file(str(path)) == ["sk-a", "sk-b"]
    path.write_text("sk-a\nsk-b\n", encoding="utf-8-sig")  # as Windows editors save UTF-8: the BOM is no key
    assert access.read_key_file(str(path)) == ["sk-a", "sk-b"]
    gate = access.Access(["sk-a"])
    assert gate.identify("1.2.3.4", "Bearer sk-a", None).identity == gate.identify("5.6.7.8", "bearer sk-a", None).identity
    assert "sk-a" not in gate.identify("1.2.3.4", "Bearer sk-a", None).identity  # the key itself is never kept


def test_concurrent_answers_cannot_overdraw_the_token_limit(guarded, limits):
    """A request reserves the most its answer can generate (max_tokens) when it is admitted, and gets
    the unused part back when the answer ends. So while one answer runs, the client's next request
    finds the bucket at or below zero: 429 (it was admitted, and 5 answers of 248 tokens could run
    against 150 tokens/min). The first answer is held at its first piece: no race with the clock."""
    limits(tokens=10)
    rate_key = guarded.access.identify("-", f"Bearer {KEYS[0]}", None).rate_key
    hold = Hold(guarded.engine, 1)
    try:
        first = Stream(guarded.url, chat_body(QUESTIONS[2], max_tokens=24, stream_options={"include_usage": True}),
                       headers=bearer(KEYS[0]))
        hold.wait()
        assert guarded.access.buckets["tokens", rate_key].level == 10 - 24  # reserved: one answer's worth of debt
        second = Stream(guarded.url, chat_body(QUESTIONS[2], max_tokens=2), headers=bearer(KEYS[0]))
        answer = json.loads(second.response.read())
        assert second.status == 429 and "10 generated tokens per minute" in answer["error"]["message"], answer
        assert second.response.getheader("Retry-After") == str(math.ceil((1 - (10 - 24)) * 60 / 10))
    finally:
        hold.release.set()
        guarded.engine.on_piece = None
    events = list(first.events())
    first.close()
    used = events[-2]["usage"]["completion_tokens"]
    assert events[-1] == "[DONE]" and 0 < used <= 24
    assert guarded.access.buckets["tokens", rate_key].level == 10 - used  # what it did not use came back
    # a request that never runs (refused by a full queue: none here; cancelled while waiting) gives back all
    reservation = guarded.access.reserve(guarded.access.identify("-", f"Bearer {KEYS[1]}", None), 7)
    reservation.settle(0)
    reservation.settle(5)  # only the first settle counts
    assert guarded.access.buckets["tokens", reservation.client.rate_key].level == 10


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, small_tokenizer):
    """`python serve.py` with an API key, 1 request per minute per client, no --trusted-proxy, and uvicorn's
    access log on (--log-level info). The rate limit's clock is real: 60 s per request is the test's margin."""
    folder = tmp_path_factory.mktemp("serve_keyed")
    server = Server(make_checkpoint(folder, small_tokenizer, kind="chat", sequence_len=128),
                    ["--api-key", KEYS[0], "--rate-limit-requests", "1", "--max-batch", "1", "--log-level", "info"],
                    folder)
    yield server
    server.stop()


def test_forwarded_for_without_a_trusted_proxy_is_only_a_claim(keyed):
    """uvicorn believed X-Forwarded-For from any loopback peer: a local client (or anything reaching the
    port through an ssh -L forward) got a fresh bucket per forged address, and the access log showed it."""
    session = request(keyed.url, "GET", "/")[1]["Set-Cookie"].split(";")[0]  # page sessions: limited per address
    forged = [f"203.0.113.{i}" for i in range(1, 5)]
    statuses = [request(keyed.url, "POST", "/v1/chat/completions", chat_body(QUESTIONS[0], max_tokens=1),
                        {"Cookie": session, "X-Forwarded-For": address})[0] for address in forged]
    assert statuses == [200, 429, 429, 429]
    posts = lambda: [line for line in keyed.output().splitlines() if '"POST /v1/chat/completions' in line]
    wait_for(lambda: len(posts()) == len(forged), 60, "the access log's lines")
    assert all("127.0.0.1:" in line for line in posts()), posts()
    assert not any(address in keyed.output() for address in forged)


def responses_counted(server) -> dict:
    status, _, text = request(server.url, "GET", "/metrics", headers=bearer(KEYS[0]))
    assert status == 200, text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("nanoschnack_responses_total")}


def test_metrics_need_the_key_and_every_response_is_counted_with_nosniff(keyed):
    session = request(keyed.url, "GET", "/")[1]["Set-Cookie"].split(";")[0]
    before = responses_counted(keyed)
    answers = [request(keyed.url, "GET", "/metrics"),
               request(keyed.url, "GET", "/metrics", headers={"Cookie": session}),  # a page session is not enough
               request(keyed.url, "GET", "/metrics", headers=bearer("sk-falsch")),
               request(keyed.url, "GET", "/v1/models"),
               request(keyed.url, "GET", "/health", headers={"Host": "evil.example"}),
               request(keyed.url, "GET", "/v1/nothing", headers=bearer(KEYS[0]))]
    assert [status for status, _, _ in answers] == [401, 401, 401, 401, 400, 404]
    assert all(head["X-Content-Type-Options"] == "nosniff" for _, head, _ in answers)
    assert [answer["error"]["code"] for _, _, answer in answers[:5]] == ["invalid_api_key"] * 4 + ["invalid_host"]
    assert "chat page" not in answers[1][2]["error"]["message"]  # /metrics: only a key will do
    after = responses_counted(keyed)
    counted = {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    assert counted == {"200": 1, "400": 1, "401": 4, "404": 1}  # the 200: the first /metrics itself


def test_buckets_at_their_edges():
    """A bucket holds at most a minute's worth, however long it stood idle; a token bucket at exactly zero is in
    debt (the next request waits); what an answer gives back never fills a bucket past its minute's worth, and
    only a reservation's first settle counts; a reservation split for n answers keeps every token."""
    clock = Clock()
    gate = access.Access(requests_per_minute=3, tokens_per_minute=10, clock=clock)
    me = gate.identify("192.0.2.1", None, None)
    level = lambda kind: gate.buckets[kind, me.rate_key].level
    gate.admit(me)
    clock.now += 3600  # an hour idle: 3 requests now, not 60
    for _ in range(3):
        gate.admit(me)
    with pytest.raises(access.RateLimited) as e:
        gate.admit(me)
    assert e.value.retry_after == 20
    clock.now += 60
    answer = gate.reserve(me, 10)  # exactly what is left: zero is a debt too
    assert level("tokens") == 0
    with pytest.raises(access.RateLimited, match="10 generated tokens per minute") as e:
        gate.admit(me)
    assert e.value.retry_after == 6
    clock.now += 60  # refilled to 10 while the answer ran
    answer.settle(4)  # 6 unused: the bucket still holds 10, not 16
    assert level("tokens") == 10
    answer = gate.reserve(me, 7)
    answer.settle(5)  # gives back 2
    answer.settle(0)  # only the first settle counts
    assert level("tokens") == 5
    parts = gate.reserve(me, 5).split(2)  # n = 2: 3 + 2, no token lost in the split
    assert [part.tokens for part in parts] == [3, 2] and level("tokens") == 0
    for part in parts:
        part.settle(0)
    assert level("tokens") == 5


def test_a_request_the_queue_refuses_leaves_no_job_and_no_reservation_behind():
    """A request's n answers are queued all or none: when the queue takes the first and refuses the second,
    the first is cancelled (it would run for nobody) and the request's whole token reservation comes back."""
    import engine
    import serve
    from session import Sampling
    gate = access.Access(tokens_per_minute=100, clock=Clock())
    me = gate.identify("192.0.2.1", None, None)

    class OneSlot:  # an engine whose queue has room for one job
        def __init__(self):
            self.queued, self.cancelled = [], []

        def submit(self, job):
            if self.queued:
                raise engine.QueueFull("the server is busy")
            self.queued.append(job)

        def cancel(self, job):  # as Queue.cancel does for a waiting job: its last event
            self.cancelled.append(job)
            job.emit("cancelled")
    one_slot = OneSlot()
    jobs = [engine.Job([1, 2, 3], Sampling(), deliver=lambda event: None) for _ in range(2)]
    with pytest.raises(serve.APIError) as e:
        serve.submit_all(one_slot, jobs, gate.reserve(me, 40).split(2))
    assert e.value.status == 429 and e.value.code == "queue_full"
    assert one_slot.cancelled == [jobs[0]]
    assert gate.buckets["tokens", me.rate_key].level == 100


def test_the_token_limit_charges_the_stop_token(guarded, limits, monkeypatch, small_tokenizer):
    """An answer is charged what its usage.completion_tokens says it generated, the stop token that ends it
    included (engine.completion_tokens, the one rule). The model's tokens are scripted: two, then the stop."""
    import gpt
    import torch
    limits(tokens=10)
    a = small_tokenizer.encode("ab")[0]
    script = iter([a, a, small_tokenizer.special["<|assistant_end|>"]])
    monkeypatch.setattr(gpt, "sample_next_token", lambda *args, **kw: torch.tensor([[next(script)]]))
    rate_key = guarded.access.identify("-", f"Bearer {KEYS[0]}", None).rate_key
    status, _, answer = post(guarded, chat_body(QUESTIONS[0], max_tokens=8), bearer(KEYS[0]))
    assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
    assert guarded.access.buckets["tokens", rate_key].level == 10 - 3


def test_an_answer_that_generates_nothing_gives_its_whole_reservation_back():
    """settle_when_done: a job that ends without generating (cancelled while it waited, failed, the engine gone) gives
    back all its tokens with its last event; one that generated is charged what it generated (the engine's
    on_finish), and its last event after that changes nothing. No token is lost or given twice."""
    import engine
    import serve
    from session import Sampling
    gate = access.Access(tokens_per_minute=100, clock=Clock())
    me = gate.identify("192.0.2.1", None, None)
    level = lambda: gate.buckets["tokens", me.rate_key].level
    for last in ("cancelled", "error"):
        job = engine.Job([1, 2, 3], Sampling(), deliver=lambda event: None)
        serve.settle_when_done(job, gate.reserve(me, 40))
        assert level() == 60
        job.emit(last, None)
        assert level() == 100, last
    job = engine.Job([1, 2, 3], Sampling(), deliver=lambda event: None)
    serve.settle_when_done(job, gate.reserve(me, 40))
    job.on_finish(12)  # the engine: 12 tokens generated
    job.emit("done", None)
    assert level() == 100 - 12


def test_allowed_hosts_follow_the_bind_address_and_host_names_drop_only_the_port():
    """--host 0.0.0.0 or :: (every interface) answers any Host name; a loopback address its loopback names; another
    address only itself. A Host header's name is compared without its port, an IPv6 literal whole in its brackets
    (so [2001:db8::1] is not taken for [::1])."""
    for bind in ("0.0.0.0", "::"):
        assert access.default_allowed_hosts(bind) == ["*"], bind
    for bind in ("127.0.0.1", "localhost", "::1"):
        assert access.default_allowed_hosts(bind) == list(access.LOOPBACK_HOSTS), bind
    assert access.default_allowed_hosts("192.0.2.7") == ["192.0.2.7"]
    assert access.default_allowed_hosts("2001:db8::1") == ["[2001:db8::1]"]
    names = {"LocalHost:8000": "localhost", "[::1]:8000": "[::1]", "[::1]": "[::1]", "[2001:db8::1]:80": "[2001:db8::1]",
             " example.org ": "example.org", "": ""}
    assert {host: access.host_name(host) for host in names} == names


def test_a_reservation_is_what_the_context_leaves_when_max_tokens_asks_for_more(guarded, limits):
    """An answer generates at most what the context (512 tokens here) leaves after its prompt: a request whose
    max_tokens asks for more reserves only that, so the client is not held to tokens no answer could generate."""
    limits(tokens=10)
    rate_key = guarded.access.identify("-", f"Bearer {KEYS[0]}", None).rate_key
    hold = Hold(guarded.engine, 1)
    try:
        stream = Stream(guarded.url, chat_body(QUESTIONS[2], max_tokens=500), headers=bearer(KEYS[0]))
        left = guarded.session.context_len - len(hold.wait().prompt)
        assert left < 500  # max_tokens asks for more than the context leaves
        assert guarded.access.buckets["tokens", rate_key].level == 10 - left
        stream.close()
    finally:
        hold.release.set()
        guarded.engine.on_piece = None
    guarded.idle()  # the answer is over (cancelled, its client gone) before the next test
