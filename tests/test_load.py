"""Load without loss (issue 18): 50 clients x 3 requests at once against a real `python serve.py`
on loopback (continuous batching, a short queue), mixed streamed, non-streamed and streamed
requests whose client hangs up after the first piece. Every request gets a complete answer or
a clean error (429 in OpenAI's shape with Retry-After), /health keeps answering throughout,
and the server's counters add up to what the clients saw.

The product's bound for /health is 1 s. Asserting 1 s would make the test depend on how
loaded the machine is, so the test asserts HEALTH_BOUND (generous), prints the slowest
/health it measured, and bench/serve.py reports it for the record."""
import http.client
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")

from conftest import make_checkpoint
from test_serve import QUESTIONS, Server, chat_body, get, health, wait_idle

CLIENTS, REQUESTS = 50, 3
MAX_TOKENS = 12
HEALTH_BOUND = 10.0  # seconds; the product's target is 1 s (measured, printed)
FLAGS = ["--max-batch", "4", "--max-queue", "16", "--max-tokens", str(MAX_TOKENS), "--log-level", "warning"]


def one_request(port: int, kind: str, question: str) -> tuple[str, dict]:
    """("answer", {...}), ("left", {}) or ("refused", {...}); anything else raises."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = chat_body(question, max_tokens=MAX_TOKENS, temperature=1.0, stream=kind != "whole",
                     stream_options={"include_usage": True} if kind != "whole" else None)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    try:
        if response.status == 429:
            error = json.loads(response.read())["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full", error
            assert response.getheader("Retry-After") == "1"
            return "refused", error
        assert response.status == 200, (response.status, response.read()[:500])
        if kind == "whole":
            answer = json.loads(response.read())
            assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
            assert 0 < answer["usage"]["completion_tokens"] <= MAX_TOKENS
            return "answer", answer["usage"]
        events = []
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            assert "error" not in event, event
            events.append(event)
            if kind == "leave" and event["choices"] and event["choices"][0]["delta"].get("content"):
                conn.sock.shutdown(socket.SHUT_RDWR)  # hang up mid-answer
                return "left", {}
        else:
            raise AssertionError(f"the stream ended without [DONE]: {events[-2:]}")
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length") and events[-1]["usage"], events[-2:]
        return "answer", events[-1]["usage"]
    finally:
        conn.close()


def metrics(url) -> dict:
    text = get(url, "/metrics")[1]
    return {name: float(value) for name, value in (l.rsplit(" ", 1) for l in text.splitlines() if l[:1] != "#")}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, small_tokenizer):
    folder = tmp_path_factory.mktemp("serve_load")
    server = Server(make_checkpoint(folder, small_tokenizer, kind="chat", sequence_len=256), FLAGS, folder)
    yield server
    server.stop()


@pytest.mark.slow
def test_many_clients_each_get_an_answer_or_a_clean_error(loaded):
    url = loaded.url
    before, metrics_before = health(url), metrics(url)
    outcomes, failures, slowest = [], [], [0.0]
    done = threading.Event()

    def client(i):
        for r in range(REQUESTS):
            kind = ("stream", "whole", "leave")[(i + r) % 3]
            try:
                outcomes.append(one_request(loaded.port, kind, QUESTIONS[(i + r) % len(QUESTIONS)]))
            except Exception as e:  # noqa: BLE001 (reported below)
                failures.append(f"client {i} request {r} ({kind}): {type(e).__name__}: {e}")

    def watch_health():
        while not done.is_set():
            start = time.monotonic()
            status, h = get(url, "/health")
            slowest[0] = max(slowest[0], time.monotonic() - start)
            if status != 200 or h["status"] != "ok":
                failures.append(f"/health answered {status}: {h}")
            done.wait(0.1)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    done.set()
    watcher.join(60)
    assert not failures, failures[:5]
    assert len(outcomes) == CLIENTS * REQUESTS
    print(f"slowest /health during the load: {slowest[0] * 1e3:.0f} ms (product target 1 s)")
    assert slowest[0] < HEALTH_BOUND

    kinds = [kind for kind, _ in outcomes]
    answers, left, refused = kinds.count("answer"), kinds.count("left"), kinds.count("refused")
    assert answers > 0 and left > 0  # the round tested both (refusals depend on timing, and may be 0)
    after = wait_idle(url)  # every accepted request has ended, one way or another
    d = {k: after[k] - before[k] for k in ("requests", "completed", "cancelled", "errors", "rejected", "timeouts",
                                           "completion_tokens")}
    assert d["errors"] == 0 and d["timeouts"] == 0, d
    assert d["rejected"] == refused and d["requests"] == answers + left, (d, answers, left, refused)
    assert d["completed"] + d["cancelled"] == d["requests"], d  # every accepted request ended exactly once
    assert d["completed"] >= answers  # a client that left may have had its whole answer already
    assert d["completion_tokens"] >= sum(u["completion_tokens"] for kind, u in outcomes if kind == "answer")
    m = metrics(url)
    grew = lambda name: m.get(name, 0) - metrics_before.get(name, 0)
    assert grew('nanoschnack_responses_total{status="429"}') == refused
    assert grew('nanoschnack_generations_total{outcome="completed"}') == d["completed"]
    assert grew("nanoschnack_tokens_generated_total") == d["completion_tokens"]
    assert m["nanoschnack_running"] == 0 and m["nanoschnack_queue_length"] == 0
