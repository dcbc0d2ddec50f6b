"""serve.py's app in this process (serve.create_app on uvicorn in a thread), each test holding a generation at
a known token, and the page in a headless Chromium. Split from tests/test_serve.py, whose helpers and
chat server these tests share (this module starts its own).

The browser tests drive chromedriver through the W3C WebDriver HTTP API with urllib (a dozen
calls) instead of depending on selenium, whose driver manager also tries to download things.
"""
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install -e '.[web]'")

import uvicorn

import engine
import gpt
import serve
from conftest import make_checkpoint
from session import Sampling, load_session
from test_serve import LONG, QUESTIONS, Stream, chat_body, free_port, get, post, request, user, wait_for
from test_serve import server  # noqa: F401 (the chat server fixture the browser test asks for)


# -----------------------------------------------------------------------------
# Tests that reach into the server: serve.create_app on uvicorn in a thread of this process.
# They hold a generation at a known token (engine.on_piece) instead of racing it, so they
# do not depend on how fast the machine is.

READ_TIMEOUT = 1.0  # the live server's --header-timeout and --body-timeout


class LiveServer:
    def __init__(self, checkpoint, access=None):
        self.session = session = load_session(str(checkpoint), "cpu", sampling=Sampling())
        self.limits = serve.Limits(max_tokens=LONG, max_queue=3)
        self.app = serve.create_app(session, self.limits, access=access)
        self.engine = self.app.state.engine
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = serve.uvicorn_config(self.app, "127.0.0.1", self.port, "warning", READ_TIMEOUT, READ_TIMEOUT)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.uvicorn.started, 60, "uvicorn to start")

    def idle(self) -> dict:
        wait_for(lambda: not self.engine.busy and not self.engine.waiting, 60, "the model to be idle")
        return dict(self.engine.counts)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(30)


class Hold:
    """engine.on_piece that holds the generation when its n-th text piece is ready, until released."""

    def __init__(self, engine, n: int):
        self.engine, self.n, self.calls, self.job, self.tokens = engine, n, 0, None, None
        self.reached, self.release = threading.Event(), threading.Event()
        engine.on_piece = self

    def __call__(self, job):
        self.calls += 1
        if self.calls == self.n:
            self.job, self.tokens = job, len(job.reply.ids)
            self.reached.set()
            self.release.wait(300)

    def wait(self):
        assert self.reached.wait(120), "the generation never reached the held piece"
        return self.job


@pytest.fixture(scope="module")
def live(tmp_path_factory, small_tokenizer):
    folder = tmp_path_factory.mktemp("serve_live")
    server = LiveServer(make_checkpoint(folder, small_tokenizer, kind="chat", sequence_len=2048))
    yield server
    server.stop()


@pytest.fixture
def hold(live):
    holds = []
    yield lambda n: holds.append(Hold(live.engine, n)) or holds[-1]
    for h in holds:
        h.release.set()
    live.engine.on_piece = None


def hang_up(conn):
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def check_stopped_at_the_hold(live, hold, before):
    """The client is gone, the server noticed: release the generation, it must stop right there."""
    job = hold.wait()
    wait_for(job.cancelled.is_set, 60, "the server to notice the disconnect")
    hold.release.set()
    after = live.idle()
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert hold.calls == hold.n  # no piece after the held one
    assert after["completion_tokens"] - before["completion_tokens"] == hold.tokens  # and no token either


def test_disconnect_mid_stream_frees_the_model(live, hold):
    before = live.idle()
    h = hold(5)
    stream = Stream(live.url, chat_body(QUESTIONS[0], max_tokens=LONG))
    assert stream.first_content()
    h.wait()
    stream.close()
    check_stopped_at_the_hold(live, h, before)
    status, answer = post(live.url, "/v1/chat/completions", chat_body(QUESTIONS[1], max_tokens=5))
    assert status == 200 and answer["usage"]["completion_tokens"] <= 5


def test_disconnect_while_waiting_for_a_whole_answer(live, hold):
    """The fix for a flaky test: it used to compare tokens generated before the server noticed
    with LONG // 2, a race against the clock. Now the generation waits at its 3rd piece until
    the server has registered the disconnect (every DISCONNECT_CHECK_SECONDS), then must stop."""
    before = live.idle()
    h = hold(3)
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(QUESTIONS[0], max_tokens=LONG)),
                 {"Content-Type": "application/json"})
    h.wait()
    hang_up(conn)
    check_stopped_at_the_hold(live, h, before)


def test_request_time_limit(live, hold):
    """--request-timeout: a request that outlives it gets 504 (or, streamed, an error event).
    The generation is held at its 2nd piece and its deadline is moved into the past there,
    as if --request-timeout had passed: no race with the clock, however slow the machine."""
    live.idle()
    h = hold(2)
    result = {}
    t = threading.Thread(target=lambda: result.update(
        answer=post(live.url, "/v1/chat/completions", chat_body(QUESTIONS[1], max_tokens=LONG))))
    t.start()
    job = h.wait()
    assert job.deadline - job.submitted == pytest.approx(live.limits.request_seconds, abs=60)
    job.deadline = time.monotonic() - 1
    h.release.set()
    t.join(120)
    status, answer = result["answer"]
    assert status == 504 and answer["error"]["code"] == "request_timeout", answer
    assert answer["error"]["type"] == "server_error"
    live.engine.on_piece = None
    events = stream_past_its_deadline(live, hold)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout", events[-3:]
    assert live.idle()["timeouts"] >= 2


def stream_past_its_deadline(live, hold, **fields):
    """A streamed answer held after two pieces while its deadline passes, then let go: its events."""
    h = hold(2)
    stream = Stream(live.url, chat_body(QUESTIONS[1], max_tokens=LONG, **fields))
    job = h.wait()
    job.deadline = time.monotonic() - 1
    h.release.set()
    events = list(stream.events())
    stream.close()
    return events


def test_a_burst_fills_free_rows_before_the_queue(live, hold):
    """Jobs wait until the worker takes them, one per step; a burst that free rows of the batch
    will take must not count against --max-queue (it once got 429s while rows were free).
    The worker is held inside its first answer, so no job is taken while the burst arrives."""
    before = live.idle()
    h = hold(1)
    first = Stream(live.url, chat_body(QUESTIONS[0], max_tokens=LONG))
    h.wait()
    free = live.limits.max_batch - 1
    burst = [Stream(live.url, chat_body(QUESTIONS[1], max_tokens=LONG)) for _ in range(free + live.limits.max_queue)]
    assert [s.status for s in burst] == [200] * len(burst)
    status, _, answer = request(live.url, "POST", "/v1/chat/completions", chat_body(QUESTIONS[0]))
    assert status == 429 and answer["error"]["code"] == "queue_full"
    for s in [first, *burst]:
        s.close()
    wait_for(lambda: not live.engine.waiting, 60, "the queue to notice its clients are gone")
    h.release.set()
    after = live.idle()
    assert after["rejected"] == before["rejected"] + 1 and after["cancelled"] == before["cancelled"] + 1 + len(burst)


def test_newcomers_start_together_within_the_prefill_budget(live, hold, small_tokenizer, monkeypatch):
    """Jobs that wait together start in the same step while their prompts, padded to the
    longest, fit in engine.PREFILL_TOKENS_PER_STEP; a prompt over half of it starts in a
    step of its own (the prompts' sum would fit: the padding would not). Seen from
    the worker: how many rows run when each job's first token is sampled. The worker is held
    inside a first answer while the others queue, so which step takes whom is deterministic."""
    live.idle()
    h = hold(1)
    first = Stream(live.url, chat_body(QUESTIONS[0], max_tokens=LONG))
    h.wait().stop_ids = ()  # no answer here may end early: the rows counted below stay
    long_question = "Wort " * (engine.PREFILL_TOKENS_PER_STEP * 2 // 3 // len(small_tokenizer.encode("Wort ")))
    newcomers = [Stream(live.url, chat_body(q, max_tokens=4)) for q in [long_question, *QUESTIONS[1:]]]
    wait_for(lambda: len(live.engine.waiting) == len(newcomers), 60, "the newcomers to queue")
    jobs, rows_at_first_token = list(live.engine.waiting), {}
    for job in jobs:
        job.stop_ids = ()
    lengths = [len(job.prompt) for job in jobs]
    assert engine.PREFILL_TOKENS_PER_STEP / 2 < lengths[0] and sum(lengths) <= engine.PREFILL_TOKENS_PER_STEP, lengths
    sample = live.engine._sample

    def recording_sample(rows):
        for row in rows:
            rows_at_first_token.setdefault(row.job, len(rows))
        return sample(rows)
    monkeypatch.setattr(live.engine, "_sample", recording_sample)
    h.release.set()
    for s in newcomers:
        assert list(s.events())[-1] == "[DONE]"
    assert [rows_at_first_token[job] for job in jobs] == [2, 5, 5, 5]  # the held answer + 1, then + 3 more
    for s in [first, *newcomers]:
        s.close()
    live.idle()


def test_a_prompt_that_fails_to_prefill_fails_alone(live, hold, monkeypatch):
    """Newcomers are prefilled in one forward; when it fails (here: out of memory whenever the long
    prompt is in it), each is tried alone, and only the request that fails alone gets the error."""
    before = live.idle()
    h = hold(1)
    first = Stream(live.url, chat_body(QUESTIONS[0], max_tokens=LONG))
    h.wait()
    prefill, long_question = engine.prefill, "Wort " * 100

    def prefill_without_memory(model, cache, start, keeps, prompts):
        if max(map(len, prompts)) > 100:
            raise torch.OutOfMemoryError("no memory for the long prompt")
        return prefill(model, cache, start, keeps, prompts)
    monkeypatch.setattr(engine, "prefill", prefill_without_memory)
    results = {}
    threads = [threading.Thread(target=lambda q=q: results.update({q: post(live.url, "/v1/chat/completions",
                                                                           chat_body(q, max_tokens=4))}))
               for q in (QUESTIONS[1], long_question, QUESTIONS[2])]
    for t in threads:
        t.start()
    wait_for(lambda: len(live.engine.waiting) == 3, 60, "the three requests to queue")
    h.release.set()
    for t in threads:
        t.join(120)
    first.close()
    status, answer = results[long_question]
    assert status == 500 and "OutOfMemoryError" in answer["error"]["message"]
    assert results[QUESTIONS[1]][0] == 200 and results[QUESTIONS[2]][0] == 200
    after = live.idle()
    assert after["errors"] == before["errors"] + 1 and after["completed"] == before["completed"] + 2


def test_a_seed_gives_the_same_answer_in_a_batch(live, hold, monkeypatch):
    """A seeded request draws its random numbers from its own generator, also when it is
    sampled in one call with other rows: alone or next to an unseeded answer, the same text."""
    body = chat_body(QUESTIONS[3], max_tokens=30, temperature=1.0, top_k=40)
    alone = post(live.url, "/v1/chat/completions", {**body, "seed": 7})[1]["choices"][0]["message"]["content"]
    live.idle()
    h = hold(1)
    other = Stream(live.url, {**body, "max_tokens": LONG})  # the same settings, no seed
    h.wait().stop_ids = ()  # it cannot end before the seeded answer (its sampled tokens are random)
    batch_sizes, sample = [], live.engine._sample
    monkeypatch.setattr(live.engine, "_sample", lambda rows: batch_sizes.append(len(rows)) or sample(rows))
    result = {}
    t = threading.Thread(target=lambda: result.update(
        answer=post(live.url, "/v1/chat/completions", {**body, "seed": 7})[1]))
    t.start()
    wait_for(lambda: live.engine.waiting, 60, "the seeded request to queue")
    h.release.set()
    t.join(120)
    other.close()
    live.idle()
    tokens = result["answer"]["usage"]["completion_tokens"]
    assert batch_sizes[:tokens] == [2] * tokens, "the seeded answer was not sampled next to the other one"
    assert result["answer"]["choices"][0]["message"]["content"] == alone


def test_a_bug_is_a_500_that_is_counted_and_carries_the_headers(live, monkeypatch):
    """A bug's 500 was answered by Starlette's outermost middleware, past the Guard: uncounted in
    /metrics and without nosniff. Now the Guard answers it, and logs the traceback (it is a bug)."""
    def responses(status):
        text = request(live.url, "GET", "/metrics")[2]
        return float(next((line.split()[-1] for line in text.splitlines()
                           if line.startswith(f'nanoschnack_responses_total{{status="{status}"}}')), 0))
    before = responses(500)

    def broken_submit(job):
        raise ValueError("kaputt")
    monkeypatch.setattr(live.engine, "submit", broken_submit)
    status, head, answer = request(live.url, "POST", "/v1/chat/completions", chat_body(QUESTIONS[0]))
    assert status == 500 and answer["error"]["type"] == "server_error" and "ValueError" in answer["error"]["message"]
    assert head["X-Content-Type-Options"] == "nosniff" and responses(500) == before + 1


def test_completion_tokens_follow_one_rule(live, monkeypatch, small_tokenizer):
    """usage.completion_tokens and /health's completion_tokens both count the stop token that
    ends an answer (they used to disagree). The model's tokens are scripted: two, then a stop."""
    tok = small_tokenizer
    a, b = tok.encode("ab")[:1] * 2
    stops = {"/v1/chat/completions": tok.special["<|assistant_end|>"], "/v1/completions": tok.bos_id}
    for path, stop in stops.items():
        before = live.idle()["completion_tokens"]
        script = iter([a, b, stop])
        monkeypatch.setattr(gpt, "sample_next_token", lambda *args, **kw: torch.tensor([[next(script)]]))
        body = chat_body(QUESTIONS[0]) if "chat" in path else {"prompt": "Es war einmal", "max_tokens": 24}
        status, answer = post(live.url, path, body)
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop", answer
        assert answer["usage"]["completion_tokens"] == 3
        assert live.idle()["completion_tokens"] - before == 3


def closed_after(sock, limit: float) -> float:
    """Seconds until the server closes `sock` (reading whatever it sends first), at most `limit`."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"the server kept the connection open for {limit} s")
    return time.monotonic() - start


def test_read_timeouts_close_idle_and_half_sent_connections(live):
    """A connection that sends nothing, half its headers, or less body than it announced is
    closed after READ_TIMEOUT, while the server goes on answering others."""
    body = json.dumps(chat_body(QUESTIONS[0], max_tokens=3)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sends = {"nothing": b"", "half the headers": head[:40], "half the body": head + body[:10],
             "a whole request, then half the next one's headers": head + body + head[:30]}
    start = time.monotonic()
    socks = {}
    for what, data in sends.items():
        socks[what] = socket.create_connection(("127.0.0.1", live.port))
        socks[what].sendall(data)
    try:
        # meanwhile others are served
        assert post(live.url, "/v1/chat/completions", chat_body(QUESTIONS[1], max_tokens=5))[0] == 200
        assert get(live.url, "/health")[0] == 200
        for what, sock in socks.items():
            closed_after(sock, 60)  # generous: only "closed at all, not after minutes" matters
            assert time.monotonic() - start >= 0.9 * READ_TIMEOUT, f"{what}: closed before the timeout"
    finally:
        for sock in socks.values():
            sock.close()



# -----------------------------------------------------------------------------
# The page in a real browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,900"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
ENTER = "\ue007"


class Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API."""

    def __init__(self, chromium: str, chromedriver: str, profile: str):
        port = free_port()
        self.driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_for(self.ready, 30, "chromedriver")
        options = {"binary": chromium, "args": CHROMIUM_ARGS + [f"--user-data-dir={profile}"]}
        session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        self.session = f"/session/{session['sessionId']}"

    def ready(self) -> bool:
        try:
            return self.call("GET", "/status")["ready"]
        except OSError:
            return False

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from None

    def go(self, url):
        self.call("POST", self.session + "/url", {"url": url})

    def find(self, css) -> str:
        return self.call("POST", self.session + "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css, text):
        self.call("POST", f"{self.session}/element/{self.find(css)}/value", {"text": text})

    def click(self, css):
        self.call("POST", f"{self.session}/element/{self.find(css)}/click", {})

    def clear(self, css):
        self.call("POST", f"{self.session}/element/{self.find(css)}/clear", {})

    def js(self, script, *args):
        return self.call("POST", self.session + "/execute/sync", {"script": script, "args": list(args)})

    def quit(self):
        try:
            self.call("DELETE", self.session)
        finally:
            self.driver.terminate()
            self.driver.wait(10)


BUBBLES = """return [...document.querySelectorAll('.nachricht')].map(b => ({
    role: b.classList.contains('user') ? 'user' : 'assistant', state: b.dataset.zustand || '',
    pieces: Number(b.dataset.stuecke || 0), text: b.querySelector('.text').textContent}));"""


def page_done(browser, n: int):
    """The page's messages once there are n and the last answer has ended, else None."""
    bubbles = browser.js(BUBBLES)
    return bubbles if len(bubbles) == n and bubbles[-1]["state"] not in ("", "läuft") else None


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no chromium/chromedriver on PATH (Debian: apt-get install chromium chromium-driver; .ci/run "
                    "installs them when it runs as root)")
    b = Browser(chromium, chromedriver, str(tmp_path / "profile"))
    yield b
    b.quit()


def test_page_streams_a_german_answer_in_the_browser(server, browser):
    browser.go(server + "/")
    wait_for(lambda: "Schritt 1" in browser.js("return document.getElementById('modell').textContent"),
             20, "the page to load the model info")
    browser.click("#einstellungen summary")  # open the settings, make the answer greedy and short
    browser.clear("#temperatur")
    browser.type("#temperatur", "0")
    browser.clear("#max-tokens")
    browser.type("#max-tokens", "60")
    message = "Hallo <b>Schnack</b>! Wie groß ist München?"
    browser.type("#eingabe", message + ENTER)
    bubbles = wait_for(lambda: page_done(browser, 2), 60, "the answer to finish")
    question, answer = bubbles
    assert question == {"role": "user", "state": "", "pieces": 0, "text": message}
    assert browser.js("return document.querySelectorAll('#verlauf b').length") == 0  # text, never HTML
    expected = post(server, "/v1/chat/completions", {"messages": user(message), "temperature": 0, "top_p": 1,
                                                     "max_tokens": 60})[1]["choices"][0]["message"]["content"]
    assert answer["state"] == "fertig" and answer["text"] == expected
    assert answer["pieces"] > 5  # the page showed it piece by piece
    assert browser.js("return document.getElementById('senden').textContent") == "Senden"

    # the second message is sent with the whole conversation: the page's answer equals the API's
    browser.type("#eingabe", "Danke!")
    browser.click("#senden")
    bubbles = wait_for(lambda: page_done(browser, 4), 60, "the second answer")
    history = [*user(message), {"role": "assistant", "content": expected}, *user("Danke!")]
    expected2 = post(server, "/v1/chat/completions", {"messages": history, "temperature": 0,
                                                      "max_tokens": 60})[1]["choices"][0]["message"]["content"]
    assert bubbles[-1]["text"] == expected2

    browser.click("#neu")  # Neuer Chat: an empty page, and the next answer starts from scratch
    assert browser.js(BUBBLES) == []
    browser.type("#eingabe", message + ENTER)
    bubbles = wait_for(lambda: page_done(browser, 2), 60, "the answer in the new chat")
    assert bubbles[-1]["text"] == expected

    browser.clear("#max-tokens")  # an emptied setting sends nothing: the server's default, not max_tokens 0
    browser.click("#neu")
    browser.type("#eingabe", message + ENTER)
    bubbles = wait_for(lambda: page_done(browser, 2), 60, "the answer with the server's max_tokens")
    unlimited = post(server, "/v1/chat/completions", {"messages": user(message), "temperature": 0})
    assert bubbles[-1]["text"] == unlimited[1]["choices"][0]["message"]["content"]


def test_page_stop_ends_the_generation(live, hold, browser, monkeypatch):
    """"Stopp" during a long answer: the page keeps what it got, the server drops the generation.
    It used to compare the tokens generated before the server noticed with LONG // 2, a race;
    now the generation waits at its 5th piece until the server has registered the disconnect.
    The page samples (its temperature is not 0), and a random model's sample can be any special
    token, each of which ends a chat answer: with no stop tokens the answer surely reaches its 5th
    piece (it failed so once, in a clean-clone CI run)."""
    monkeypatch.setattr(live.session, "chat_stop_ids", set())
    browser.go(live.url + "/")
    wait_for(lambda: "Schritt 1" in browser.js("return document.getElementById('modell').textContent"),
             20, "the page to load the model info")
    browser.click("#einstellungen summary")
    browser.clear("#max-tokens")
    browser.type("#max-tokens", str(LONG))
    before = live.idle()
    h = hold(5)
    browser.type("#eingabe", "Erzähl mir eine lange Geschichte." + ENTER)
    h.wait()
    wait_for(lambda: browser.js(BUBBLES)[-1]["pieces"] == 4, 30, "the page to show the 4 pieces sent")
    assert browser.js("return document.getElementById('senden').textContent") == "Stopp"
    browser.click("#senden")
    check_stopped_at_the_hold(live, h, before)
    bubbles = wait_for(lambda: page_done(browser, 2), 30, "the answer to stop")
    assert bubbles[-1]["state"] == "abgebrochen" and bubbles[-1]["text"] and bubbles[-1]["pieces"] == 4


RECORD_REQUESTS = """window.sent = []; const fetched = window.fetch;
window.fetch = (url, options) => { if (options && options.body) window.sent.push(JSON.parse(options.body));
                                   return fetched(url, options); };"""
NOTES = "return [...document.querySelectorAll('.hinweis')].map(n => n.textContent)"


def load_page(live, browser):
    browser.go(live.url + "/")
    wait_for(lambda: "Schritt 1" in browser.js("return document.getElementById('modell').textContent"),
             20, "the page to load the model info")
    browser.js(RECORD_REQUESTS)  # the bodies the page sends: window.sent


def ask(browser, question: str, n: int):
    """Type a question (set as the field's value: chromedriver types no characters outside the BMP) and send it
    with Enter; the page's messages once its answer, the n-th message, has ended."""
    browser.js("document.getElementById('eingabe').value = arguments[0]", question)
    browser.type("#eingabe", ENTER)
    return wait_for(lambda: page_done(browser, n), 60, f"the answer to {question[:20]!r}")


def test_neuer_chat_during_an_answer_starts_from_nothing(live, hold, browser, monkeypatch):
    """Neuer Chat while an answer streams stops it, and the next message starts a chat of its own. The stopped
    answer ends only after the new chat has begun: it used to record its exchange there, so the new chat's first
    message carried the old question and answer along (unseen: their bubbles were gone)."""
    monkeypatch.setattr(live.session, "chat_stop_ids", set())  # the answer surely reaches its 3rd piece
    load_page(live, browser)
    before = live.idle()
    h = hold(3)
    browser.type("#eingabe", "Alte Frage im alten Chat" + ENTER)
    h.wait()
    wait_for(lambda: browser.js(BUBBLES)[-1]["pieces"] == 2, 30, "the page to show the 2 pieces sent")
    browser.click("#neu")
    check_stopped_at_the_hold(live, h, before)
    wait_for(lambda: browser.js("return document.getElementById('senden').textContent") == "Senden", 30,
             "the stopped answer to end in the page")  # its send() is over
    assert browser.js(BUBBLES) == []
    ask(browser, "Erste Frage im neuen Chat", 2)
    assert browser.js("return window.sent")[-1]["messages"] == user("Erste Frage im neuen Chat")


def test_a_long_chat_goes_on_with_its_newest_exchanges(live, browser, monkeypatch, small_tokenizer):
    """The page sent its whole history, so once a chat had more messages or characters than the server takes
    (/health's limits), every message got a 413. Now a request carries the system message, the newest exchanges
    that fit, and the question: here two exchanges, first by --max-messages, then by --max-total-chars (counted
    in code points, as the server does: a duck is one character, not two UTF-16 units). The answers are
    scripted: 3 tokens of one kind each."""
    token = small_tokenizer.encode("ab")[0]
    monkeypatch.setattr(gpt, "sample_next_token", lambda *args, **kw: torch.tensor([[token]]))
    system = "Antworte kurz."
    phases = [(6, 32_000, [f"Frage {i}" for i in range(1, 5)]),
              (64, len(system) + 50 + 2 * (50 + 10), [f"Frage {i}: " + "\U0001F986" * 41 for i in range(1, 5)])]
    for max_messages, max_total_chars, questions in phases:  # 50 characters a question, at most 10 an answer
        monkeypatch.setattr(live.limits, "max_messages", max_messages)
        monkeypatch.setattr(live.limits, "max_total_chars", max_total_chars)
        load_page(live, browser)
        browser.js("document.getElementById('max-tokens').value = '3'; "
                   "document.getElementById('system').value = arguments[0]", system)
        for i, question in enumerate(questions, 1):
            bubbles = ask(browser, question, 2 * i)
            assert bubbles[-1]["state"] == "fertig", (max_messages, i, browser.js(NOTES)[-1:])
            assert 0 < len(bubbles[-1]["text"]) <= 10, bubbles[-1]
        sent = browser.js("return window.sent")
        carried = [[m["content"] for m in r["messages"] if m["role"] != "assistant"] for r in sent]
        q1, q2, q3, q4 = questions
        assert carried == [[system, q1], [system, q1, q2], [system, q1, q2, q3], [system, q2, q3, q4]], max_messages


def test_a_stream_that_asked_for_usage_still_ends_cleanly_after_an_error(live, hold):
    """stream_options.include_usage: a streamed answer that ends in an error has no usage to report; the stream
    still ends with the error event and [DONE] (a usage chunk of the unfinished answer would crash mid-stream)."""
    live.idle()
    events = stream_past_its_deadline(live, hold, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout", events[-3:]
    assert not any("usage" in e for e in events[:-1])


def test_the_next_turn_reuses_the_cached_answer_too(live, monkeypatch, small_tokenizer):
    """A row keeps the answer's tokens as well as the prompt's: the next turn of the same conversation (the same
    prompt_cache_key) computes only its new message, not the previous answer again. The answer is scripted as
    valid text (the random model's bytes need not survive being decoded and encoded again)."""
    tok = small_tokenizer
    answer = tok.encode("Wien ist die Hauptstadt.")
    script = iter([*answer, tok.special["<|assistant_end|>"]])
    monkeypatch.setattr(gpt, "sample_next_token", lambda *args, **kw: torch.tensor([[next(script)]]))
    body = lambda messages: {**chat_body("", max_tokens=64), "messages": messages, "prompt_cache_key": "d" * 32}
    first = user(QUESTIONS[1])
    status, a1 = post(live.url, "/v1/chat/completions", body(first))
    assert status == 200 and a1["usage"]["completion_tokens"] == len(answer) + 1, a1
    monkeypatch.undo()  # the next answer is the model's own
    second = first + [{"role": "assistant", "content": a1["choices"][0]["message"]["content"]}] + user("Und?")
    status, a2 = post(live.url, "/v1/chat/completions", body(second))
    assert status == 200, a2
    assert a2["usage"]["prompt_tokens_details"]["cached_tokens"] == a1["usage"]["prompt_tokens"] + len(answer), (a1, a2)
