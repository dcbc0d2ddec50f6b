"""serve.py through a real HTTP server on loopback: OpenAI shapes, streaming, limits, concurrency,
disconnects, the official openai client and a base model. tests/test_serve_live.py reaches into the
server (held generations, time limits) and drives the page in a headless Chromium;
tests/test_serve_process.py stops and kills the engine process. Both use the helpers here.

One server per module (a subprocess running `python serve.py`, as a user would), on a tiny
random-weight checkpoint: its answers are nonsense, but with temperature 0 they are deterministic,
which is what lets the tests prove that concurrent answers do not mix.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install -e '.[web]'")


from conftest import REPO_ROOT, make_checkpoint

LONG = 1500  # max_tokens of a request that must still be running while the test acts
MAX_BATCH = 2  # the chat server generates two answers at once (continuous batching); the base server one
SERVER_FLAGS = ["--max-batch", str(MAX_BATCH), "--max-queue", "3", "--max-messages", "8", "--max-message-chars", "2000",
                "--max-total-chars", "4000", "--max-tokens", str(LONG), "--log-level", "warning"]
QUESTIONS = ["Hallo! Wie geht es dir heute?", "Was ist die Hauptstadt von Österreich?",
             "Erzähl mir etwas über Bern.", "Wie spät ist es, bitte?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


LOGS = {}  # server url -> its Server, to read what it logged


class Server:
    """`python serve.py` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint, flags, tmp_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "serve.log", "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--checkpoint", str(checkpoint),
                                      "--device", "cpu", "--port", str(self.port), *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        try:
            wait_for(self.up, 180, "the server to answer /health", interval=0.2)
        except AssertionError:
            self.stop()
            raise AssertionError(f"serve.py did not start:\n{self.output()}")

    def up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve.py exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return get(self.url, "/health")[0] == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def request(url, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or text)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw.decode()


def get(url, path):
    status, _, body = request(url, "GET", path)
    return status, body


def post(url, path, body):
    status, _, answer = request(url, "POST", path, body)
    return status, answer


def health(url) -> dict:
    return get(url, "/health")[1]


def chat_body(question, max_tokens=24, **extra):
    return {"model": "nanoschnack", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, **extra}


class Stream:
    """A streaming request on its own connection, read event by event (so a test can stop reading and hang up)."""

    def __init__(self, url, body, path="/v1/chat/completions", headers=None):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.conn.request("POST", path, json.dumps({**body, "stream": True}),
                          {"Content-Type": "application/json", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def events(self):
        """Parsed `data:` payloads ("[DONE]" as is); comments are skipped."""
        data = []
        for line in self.response:
            line = line.decode("utf-8").rstrip("\n")
            if line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                payload = "\n".join(data)
                data = []
                yield payload if payload == "[DONE]" else json.loads(payload)

    def first_content(self) -> str:
        for event in self.events():
            if event != "[DONE]" and event["choices"] and event["choices"][0]["delta"].get("content"):
                return event["choices"][0]["delta"]["content"]
        raise AssertionError("the stream ended without content")

    def close(self):
        self.conn.sock.shutdown(socket.SHUT_RDWR)  # hang up now, as a closed browser tab does
        self.conn.close()


def read_stream(url, body, path="/v1/chat/completions") -> list:
    s = Stream(url, body, path)
    assert s.status == 200, s.response.read()
    assert s.response.getheader("Content-Type").startswith("text/event-stream")
    events = list(s.events())
    s.close()
    return events


def streamed_text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]" and e["choices"])


# -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, small_tokenizer):
    folder = tmp_path_factory.mktemp("serve_chat")
    # sequence_len 2048, so that a LONG answer fits and runs for seconds on CPU
    server = Server(make_checkpoint(folder, small_tokenizer, kind="chat", sequence_len=2048), SERVER_FLAGS, folder)
    LOGS[server.url] = server
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def base_server(tmp_path_factory, small_tokenizer):
    folder = tmp_path_factory.mktemp("serve_base")
    # one at a time, and the model in serve.py's own process (--single-process): main()'s other way
    server = Server(make_checkpoint(folder, small_tokenizer, kind="base", sequence_len=256),
                    ["--max-batch", "1", "--single-process", "--log-level", "warning"], folder)
    yield server.url
    server.stop()


def test_health_models_and_page(server):
    status, h = get(server, "/health")
    assert status == 200 and h["status"] == "ok" and h["kind"] == "chat" and h["busy"] is False
    assert h["limits"]["max_tokens"] == LONG and h["limits"]["max_queue"] == 3
    status, models = get(server, "/v1/models")
    assert status == 200 and models["object"] == "list"
    [model] = models["data"]
    assert model["id"] == "nanoschnack" and model["object"] == "model" and isinstance(model["created"], int)
    assert model["owned_by"] and model["kind"] == "chat" and model["context_length"] == 2048
    status, head, page = request(server, "GET", "/")
    assert status == 200 and head["Content-Type"].startswith("text/html")
    assert "Neuer Chat" in page and "Senden" in page and "Temperatur" in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere: works offline


def test_chat_completion_shape(server):
    status, answer = post(server, "/v1/chat/completions", chat_body(QUESTIONS[0]))
    assert status == 200, answer
    assert answer["id"].startswith("chatcmpl-") and answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int) and answer["model"] == "nanoschnack"
    [choice] = answer["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
    usage = answer["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # greedy is deterministic, whatever the KV cache held before
    post(server, "/v1/chat/completions", chat_body(QUESTIONS[1]))
    assert post(server, "/v1/chat/completions", chat_body(QUESTIONS[0]))[1]["choices"] == answer["choices"]


def test_seed_repeats_a_sampled_answer(server):
    body = chat_body(QUESTIONS[3], max_tokens=30, temperature=1.0, top_p=0.9, top_k=40)
    first, again, other = (post(server, "/v1/chat/completions", {**body, "seed": seed})[1] for seed in (7, 7, 8))
    text = lambda answer: answer["choices"][0]["message"]["content"]
    assert text(first) == text(again) and text(first) != text(other)


def test_streaming_shape_and_same_answer(server):
    whole = post(server, "/v1/chat/completions", chat_body(QUESTIONS[2]))[1]
    events = read_stream(server, chat_body(QUESTIONS[2], stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "nanoschnack" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert len(chunks) > 4  # streamed in pieces, not in one
    assert streamed_text(chunks) == whole["choices"][0]["message"]["content"]


def user(text):
    return [{"role": "user", "content": text}]


BAD_REQUESTS = [  # (body, status, code, words in the message)
    (b"{not json", 400, "invalid_json", "not valid JSON"),
    ([1, 2], 422, "invalid_type", "JSON object"),
    ({"temperature": 0}, 422, "invalid_type", "messages must be a list"),
    ({"messages": []}, 400, "invalid_conversation", "non-empty"),
    ({"messages": [{"role": "wizard", "content": "Hallo"}]}, 400, "invalid_conversation", "unknown role"),
    ({"messages": [{"role": "assistant", "content": "Hallo"}]}, 400, "invalid_conversation", "'user' must come"),
    ({"messages": user("Hallo") + [{"role": "assistant", "content": "Hi"}]}, 400, "invalid_conversation",
     "end with a(n) user"),
    ({"messages": user("   ")}, 400, "invalid_conversation", "empty content"),
    ({"messages": [{"role": "user", "content": 42}]}, 422, "invalid_type", "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "unsupported_content", "only text"),
    ({"messages": user("Hallo") + [{"role": "assistant", "content": "Hi"}, *user("Na?")] * 4}, 413,
     "too_many_messages", "at most 8"),
    ({"messages": user("ä" * 2001)}, 413, "message_too_long", "at most 2,000"),
    ({"messages": [*user("a" * 1500), {"role": "assistant", "content": "b" * 1500}, *user("c" * 1500)]}, 413,
     "conversation_too_long", "at most 4,000"),
    ({"messages": user("€" * 1999), "max_tokens": 1024}, 400, "context_length_exceeded", "too long"),
    ({"messages": user("Hallo"), "stream_options": {"include_usage": True}}, 400, "invalid_value",
     "stream_options applies to streamed answers only"),
    ({"messages": user("Hallo"), "temperature": 2.5}, 400, "invalid_value", "temperature must be between 0 and 2"),
    ({"messages": user("Hallo"), "temperature": -1}, 400, "invalid_value", "temperature"),
    ({"messages": user("Hallo"), "temperature": "warm"}, 422, "invalid_type", "temperature must be a number"),
    ({"messages": user("Hallo"), "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ({"messages": user("Hallo"), "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"messages": user("Hallo"), "max_tokens": LONG + 1}, 400, "max_tokens_too_large", f"limit is {LONG}"),
    ({"messages": user("Hallo"), "max_tokens": 3.5}, 422, "invalid_type", "integer"),
    ({"messages": user("Hallo"), "n": MAX_BATCH + 1}, 400, "invalid_value", f"(--max-batch {MAX_BATCH})"),
    ({"messages": user("Hallo"), "n": 0}, 400, "invalid_value", "n must be between 1"),
    ({"messages": user("Hallo"), "stop": [chr(ord("a") + i) for i in range(17)]}, 400, "invalid_value", "at most 16"),
    ({"messages": user("Hallo"), "stop": [""]}, 400, "invalid_value", "1 to 256 characters"),
    ({"messages": user("Hallo"), "stop": "x" * 257}, 400, "invalid_value", "1 to 256 characters"),
    ({"messages": user("Hallo"), "stop": 7}, 422, "invalid_type", "stop must be a string or a list of strings"),
    ({"messages": user("Hallo"), "stop": ["\n", None]}, 422, "invalid_type", "stop must be"),
    ({"messages": user("Hallo"), "stream": "yes"}, 422, "invalid_type", "stream"),
    ({"messages": user("Hallo"), "logprobs": True}, 400, "unsupported_parameter", "logprobs is not supported"),
    ({"messages": user("Hallo"), "logprobs": 0}, 400, "unsupported_parameter", "logprobs is not supported"),
    ({"messages": user("Hallo"), "logit_bias": {"17": 5}}, 400, "unsupported_parameter", "logit_bias is not supported"),
    ({"messages": user("Hallo"), "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "unsupported_parameter", "tools is not supported"),
    ({"messages": user("Hallo"), "response_format": {"type": "json_object"}}, 400, "unsupported_parameter",
     "response_format is not supported"),
    # vLLM's sampling extensions and OpenAI's audio output: each was taken and ignored, the answer unchanged
    ({"messages": user("Hallo"), "repetition_penalty": 1.8}, 400, "unsupported_parameter",
     "repetition_penalty is not supported"),
    ({"messages": user("Hallo"), "min_p": 0.9}, 400, "unsupported_parameter", "min_p is not supported"),
    ({"messages": user("Hallo"), "min_tokens": 30}, 400, "unsupported_parameter", "min_tokens is not supported"),
    ({"messages": user("Hallo"), "ignore_eos": True}, 400, "unsupported_parameter", "ignore_eos is not supported"),
    ({"messages": user("Hallo"), "stop": "a", "include_stop_str_in_output": True}, 400, "unsupported_parameter",
     "include_stop_str_in_output is not supported"),
    ({"messages": user("Hallo"), "stop_token_ids": [5]}, 400, "unsupported_parameter",
     "stop_token_ids is not supported"),
    ({"messages": user("Hallo"), "modalities": ["text", "audio"]}, 400, "unsupported_parameter",
     "modalities is not supported"),
    ({"messages": user("Hallo"), "audio": {"voice": "alloy", "format": "wav"}}, 400, "unsupported_parameter",
     "audio is not supported"),
    ({"messages": user("Hallo"), "top_k": -2}, 400, "invalid_value", "top_k must be between -1 and"),
    (b'{"messages": "' + b"x" * (12 * 4000 + 70_000) + b'"}', 413, "request_too_large", "larger than"),
    # issue 20: each of these was a 500 (with a traceback in the log) or was taken as valid
    (b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "invalid_json", "deeper than 32"),
    (b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "invalid_json", "deeper than 32"),
    ({"messages": user("Hallo"), "seed": 10**300}, 400, "invalid_value", "seed must be between"),
    ({"messages": user("Hallo"), "top_k": -10**300}, 400, "invalid_value", "top_k must be between"),
    ({"messages": user("Hallo"), "frequency_penalty": 2.5}, 400, "invalid_value", "frequency_penalty must be between -2"),
    ({"messages": user("Hallo"), "presence_penalty": "viel"}, 422, "invalid_type", "presence_penalty must be a number"),
    ({"messages": user("Hallo"), "no_repeat_ngram_size": -1}, 400, "invalid_value", "no_repeat_ngram_size must be"),
    ({"messages": user("Hallo"), "no_repeat_ngram_size": 2.5}, 422, "invalid_type", "integer"),
    ({"messages": user("Hallo"), "max_tokens": -10**300}, 400, "invalid_value", "max_tokens must be between"),
    ({"messages": user("Hallo"), "max_tokens": 10**300}, 400, "max_tokens_too_large", "limit is"),
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "temperature": NaN}', 400, "invalid_json", "NaN"),
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "top_p": -Infinity}', 400, "invalid_json",
     "Infinity"),
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "temperature": 1e999}', 400, "invalid_value",
     "temperature must be between"),
    ({"messages": user("Hallo"), "n": True}, 422, "invalid_type", "n must be an integer"),
    ({"messages": user("Hallo"), "n": 1.0}, 422, "invalid_type", "n must be an integer"),
    ({"messages": user("Hallo"), "stream": 1}, 422, "invalid_type", "stream must be true or false"),
    ({"messages": user("Hallo"), "max_tokens": 5, "max_completion_tokens": 6}, 400, "invalid_value", "disagree"),
    ({"messages": user("Hallo"), "prompt_cache_key": 7}, 422, "invalid_type", "prompt_cache_key"),
    # a limit names the field the client sent: max_completion_tokens (OpenAI's newer name) is checked as max_tokens
    ({"messages": user("Hallo"), "max_completion_tokens": LONG + 1}, 400, "max_tokens_too_large",
     f"max_completion_tokens is {LONG + 1}"),
    ({"messages": user("Hallo"), "max_completion_tokens": 0}, 400, "invalid_value", "max_completion_tokens must be"),
    # issue 29: a lone surrogate (half of a UTF-16 pair, which JSON can escape) was a 500 where it was echoed
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "temperature": "\\ud800"}', 400, "invalid_text",
     "temperature is not valid text"),
    (b'{"messages": [{"role": "user", "content": "Hallo \\udc00!"}]}', 400, "invalid_text",
     "messages[0].content is not valid text"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83e"}]}]}', 400, "invalid_text",
     "messages[0].content[0].text is not valid text"),
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "prompt_cache_key": "a\\udfff"}', 400, "invalid_text",
     "prompt_cache_key is not valid text"),
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "\\ud800x": 1}', 400, "invalid_text",
     "\\ud800x is not valid text"),
]


@pytest.mark.parametrize("body,status,code,words", BAD_REQUESTS, ids=[c for _, _, c, _ in BAD_REQUESTS])
def test_bad_requests_get_clear_4xx(server, body, status, code, words):
    got, answer = post(server, "/v1/chat/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == code and words in error["message"], error
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}


def test_bad_requests_leave_no_traceback(server):
    """Every request above was answered without a 500, so nothing was logged as a crash."""
    assert "Traceback" not in LOGS[server].output()


def test_fields_that_change_nothing_are_accepted(server):
    """Clients send OpenAI's fields at values that ask for nothing, and fields that change no answer: all taken,
    the same greedy answer (the refused values are in BAD_REQUESTS)."""
    plain = post(server, "/v1/chat/completions", chat_body(QUESTIONS[0]))[1]["choices"][0]["message"]["content"]
    extra = dict(logprobs=False, top_logprobs=0, logit_bias={}, tools=[], tool_choice="none", response_format={"type": "text"},
                 user="u-1", metadata={"k": "v"}, store=False, parallel_tool_calls=False, n=1, stop=None,
                 repetition_penalty=1, min_p=0.0, min_tokens=0, ignore_eos=False, include_stop_str_in_output=False,
                 stop_token_ids=[], modalities=["text"], audio=None)
    status, answer = post(server, "/v1/chat/completions", chat_body(QUESTIONS[0], **extra))
    assert status == 200 and answer["choices"][0]["message"]["content"] == plain, answer


def test_tiny_sampling_values_are_greedy(server):
    """temperature 1e-38 and top_p 1e-300 are legal; they underflowed in float32 (a 500, or an
    SSE error without a finish_reason). Below MIN_TEMPERATURE / MIN_TOP_P sampling is greedy."""
    greedy = post(server, "/v1/chat/completions", chat_body(QUESTIONS[2]))[1]["choices"]
    for extra in ({"temperature": 1e-38}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300},
                  {"temperature": 1.0, "top_p": 0}):
        status, answer = post(server, "/v1/chat/completions", {**chat_body(QUESTIONS[2]), **extra})
        assert status == 200 and answer["choices"] == greedy, (extra, answer)
        events = read_stream(server, {**chat_body(QUESTIONS[2]), **extra})
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == greedy[0]["finish_reason"]
        assert streamed_text(events) == greedy[0]["message"]["content"]


def test_only_json_is_accepted(server):
    """A page on another site can POST text/plain or a form without a CORS preflight: 415."""
    body = json.dumps(chat_body(QUESTIONS[0], max_tokens=3)).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        status, _, answer = request(server, "POST", "/v1/chat/completions", body, {"Content-Type": content_type})
        assert status == 415 and answer["error"]["code"] == "unsupported_media_type", (content_type, answer)
    status, _, answer = request(server, "POST", "/v1/chat/completions", body,
                                {"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200, answer


def test_host_header_is_checked_and_nothing_redirects(server):
    port = server.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        status, _, answer = request(server, "GET", "/health", headers={"Host": host})
        assert status == 400 and answer["error"]["code"] == "invalid_host", (host, answer)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert request(server, "GET", "/health", headers={"Host": host})[0] == 200, host
    # /health/ used to redirect to http://<the request's Host>/health
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
    conn.request("GET", "/health/", headers={"Host": f"localhost:{port}"})
    response = conn.getresponse()
    assert response.status == 404 and response.getheader("Location") is None
    conn.close()


def test_page_security_headers(server):
    status, head, page = request(server, "GET", "/")
    assert status == 200
    csp = dict(d.strip().split(" ", 1) for d in head["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert csp["script-src"].startswith("'sha256-") and "unsafe" not in head["Content-Security-Policy"]
    assert len(csp["script-src"].split()) == len(csp["style-src"].split()) == 1  # the page's one script, one style
    assert csp["style-src"].startswith("'sha256-")
    assert head["X-Frame-Options"] == "DENY" and head["X-Content-Type-Options"] == "nosniff"
    assert request(server, "GET", "/health")[1]["X-Content-Type-Options"] == "nosniff"
    # (test_page_streams_a_german_answer_in_the_browser shows that the CSP lets the page's own script run)


def test_kv_cache_is_not_shared_between_clients(server):
    """A request that starts with another client's tokens must not be answered faster: the
    cache is only reused under the same prompt_cache_key, which usage shows as OpenAI does."""
    secret = [{"role": "system", "content": "Das Passwort ist Kuckucksuhr. Verrate es niemandem."}]
    first = secret + user(QUESTIONS[0])
    cached = lambda answer: answer["usage"]["prompt_tokens_details"]["cached_tokens"]
    status, a1 = post(server, "/v1/chat/completions", {**chat_body(""), "messages": first, "prompt_cache_key": "a" * 32})
    assert status == 200, a1
    second = first + [{"role": "assistant", "content": a1["choices"][0]["message"]["content"]}] + user("Und?")
    a2 = post(server, "/v1/chat/completions", {**chat_body(""), "messages": second, "prompt_cache_key": "a" * 32})[1]
    assert cached(a2) >= a1["usage"]["prompt_tokens"] - 1  # the same client's next turn reuses the cache
    guess = secret + user("Hallo")  # another client guesses the system message: no cache hit
    for key in ({}, {"prompt_cache_key": "b" * 32}):
        answer = post(server, "/v1/chat/completions", {**chat_body(""), "messages": guess, **key})[1]
        assert cached(answer) == 0 and answer["usage"]["prompt_tokens"] > 20, answer["usage"]
    again = post(server, "/v1/chat/completions", {**chat_body(""), "messages": guess})[1]
    assert cached(again) == 0  # without a key, not even a client's own earlier request


def test_client_leaving_mid_body_is_one_log_line(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b'{"messages": [')
        assert health(server)["status"] == "ok"  # the server has read it by now: it answered a later request
        sock.shutdown(socket.SHUT_RDWR)
    log = wait_for(lambda: "hung up after 14 bytes" in LOGS[server].output() and LOGS[server].output(), 60,
                   "the server to log the disconnect")
    assert "Traceback" not in log and "ClientDisconnect" not in log


def test_metrics_in_prometheus_format(server):
    post(server, "/v1/chat/completions", chat_body(QUESTIONS[0], max_tokens=5))
    status, head, text = request(server, "GET", "/metrics")
    assert status == 200 and head["Content-Type"].startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    h = health(server)
    assert values['nanoschnack_responses_total{status="200"}'] >= 1
    assert values["nanoschnack_tokens_generated_total"] == h["completion_tokens"]
    assert values['nanoschnack_generations_total{outcome="completed"}'] == h["completed"]
    assert values["nanoschnack_queue_length"] == 0 and values["nanoschnack_running"] == 0
    count = values["nanoschnack_time_to_first_token_seconds_count"]
    assert count >= 1 and values['nanoschnack_time_to_first_token_seconds_bucket{le="+Inf"}'] == count
    assert "nanoschnack_tokens_per_second_sum" in values


def test_unknown_paths_and_methods(server):
    status, answer = get(server, "/v1/nothing")
    assert status == 404 and "Not Found" in answer["error"]["message"]
    status, head, answer = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and answer["error"]["message"]
    assert head["Allow"] == "POST"  # RFC 9110: a 405 names the methods the path takes
    assert health(server)["status"] == "ok"


def concurrent_round(server, n):
    """Four clients start streaming at once; their events and when each was accepted and finished."""
    results, errors = [None] * len(QUESTIONS), []
    accepted, finished = [0.0] * len(QUESTIONS), [0.0] * len(QUESTIONS)
    start = threading.Barrier(len(QUESTIONS))

    def client(i):
        try:
            start.wait()
            s = Stream(server, chat_body(QUESTIONS[i], max_tokens=n))
            assert s.status == 200, (s.status, s.response.read())
            events = s.events()
            results[i] = [next(events)]  # the role chunk, sent as soon as the request is queued
            accepted[i] = time.time()
            results[i] += list(events)
            finished[i] = time.time()
            s.close()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results, max(accepted) < min(finished)


def test_concurrent_streams_each_get_their_own_answer(server):
    """Four clients stream at once (one generates, three wait in the queue); each gets exactly
    the answer it gets alone, so nothing mixed. Greedy, so the answers are deterministic."""
    n = 150  # tokens per answer: long enough that all four are in the server at once
    alone = [post(server, "/v1/chat/completions", chat_body(q, max_tokens=n))[1] for q in QUESTIONS]
    texts = [a["choices"][0]["message"]["content"] for a in alone]
    assert len(set(texts)) == len(texts)  # different questions, different answers: mixing would show
    # On a loaded machine a client thread can start late, after another one already finished:
    # then the round proves nothing about concurrency (its answers are still checked); try again.
    for attempt in range(3):
        results, overlapped = concurrent_round(server, n)
        for events, whole in zip(results, alone):
            assert events[-1] == "[DONE]"
            assert streamed_text(events) == whole["choices"][0]["message"]["content"]
            assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
            assert len({e["id"] for e in events[:-1]}) == 1
        assert len({events[0]["id"] for events in results}) == len(QUESTIONS)
        if overlapped:
            break
    assert overlapped, "in 3 rounds the requests never overlapped; the test proves nothing"


def health_when(url, condition, what: str, timeout: float = 30) -> dict:
    def check():
        h = health(url)
        return h if condition(h) else None
    return wait_for(check, timeout, what)


def wait_idle(url) -> dict:
    return health_when(url, lambda h: not h["busy"] and h["queued"] == 0, "the model to be idle")


def test_full_queue_gets_429_and_waiting_clients_can_leave(server):
    before = wait_idle(server)
    running = [Stream(server, chat_body(q, max_tokens=LONG)) for q in QUESTIONS[:MAX_BATCH]]
    assert all(r.first_content() for r in running)  # both rows of the batch are taken
    waiting = [Stream(server, chat_body(q, max_tokens=LONG)) for q in QUESTIONS[1:]]  # --max-queue 3
    assert [w.status for w in waiting] == [200, 200, 200]
    # /health hears from the engine process within engine_process.STATS_SECONDS: wait for it, not for time
    health_when(server, lambda h: h["running"] == MAX_BATCH and h["queued"] == 3, "two running and three queued")
    status, head, answer = request(server, "POST", "/v1/chat/completions", chat_body(QUESTIONS[0]))
    assert status == 429 and answer["error"]["code"] == "queue_full" and head["Retry-After"] == "1"
    assert answer["error"]["type"] == "rate_limit_error" and "busy" in answer["error"]["message"]
    for w in waiting:
        w.close()
    h = health_when(server, lambda h: h["queued"] == 0, "the queue to empty", timeout=10)
    assert h["running"] == MAX_BATCH, "the running answers go on"
    for r in running:
        r.close()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 3 + MAX_BATCH and after["rejected"] == before["rejected"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < MAX_BATCH * LONG  # the waiting ones never ran


def test_base_model_serves_completions_only(base_server):
    status, answer = post(base_server, "/v1/chat/completions", chat_body("Hallo"))
    assert status == 400 and answer["error"]["code"] == "base_model" and "/v1/completions" in answer["error"]["message"]
    body = {"model": "x", "prompt": "Die Hauptstadt von Deutschland ist", "temperature": 0, "max_tokens": 16}
    status, whole = post(base_server, "/v1/completions", body)
    assert status == 200, whole
    assert whole["id"].startswith("cmpl-") and whole["object"] == "text_completion"
    [choice] = whole["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    assert whole["usage"]["completion_tokens"] > 0
    events = read_stream(base_server, body, path="/v1/completions")
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    assert get(base_server, "/v1/models")[1]["data"][0]["kind"] == "base"
    assert post(base_server, "/v1/completions", {"prompt": ""})[0] == 422


GOOD_REQUESTS = [  # at the edge of a limit, or spelled as OpenAI also allows: answered, not refused
    ({"messages": user("Hallo"), "max_tokens": 3, "stop": [f"§{i}§" for i in range(16)]}, "16 stop sequences"),
    ({"messages": user("Hallo"), "max_tokens": 3, "stop": "§" * 256}, "a stop sequence of 256 characters"),
    ({"messages": [{"role": "developer", "content": "Sei kurz."}, *user("Hallo")], "max_tokens": 3},
     "the developer role"),
    ({"messages": user("Hallo"), "max_completion_tokens": 3}, "max_completion_tokens alone"),
    (b'{"messages": [{"role": "user", "content": "Hallo"}], "max_tokens": 3, "temperature": 0, "metadata": '
     + b"[" * 31 + b"]" * 31 + b"}", "a body nested 32 deep"),
]


@pytest.mark.parametrize("body,what", GOOD_REQUESTS, ids=[w for _, w in GOOD_REQUESTS])
def test_requests_at_the_limits_are_answered(server, body, what):
    if isinstance(body, dict):
        body = {"temperature": 0, **body}
    status, answer = post(server, "/v1/chat/completions", body)
    assert status == 200 and 0 < answer["usage"]["completion_tokens"] <= 3, (what, answer)


def test_usage_chunk_only_when_asked_for(server):
    """stream_options.include_usage false (or absent): no usage chunk, the finish chunk comes right before [DONE]."""
    for options in ({"include_usage": False}, {}):
        events = read_stream(server, chat_body(QUESTIONS[2], max_tokens=4, stream_options=options))
        assert events[-1] == "[DONE]" and not any("usage" in e for e in events[:-1]), options
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_one_at_a_time_engine_keeps_the_cache_per_client(base_server):
    """--max-batch 1 (the base server's Engine) keeps one KV cache: a request reuses it only under the same
    prompt_cache_key, as test_kv_cache_is_not_shared_between_clients shows for the batched engine."""
    body = {"prompt": "Das Passwort ist Kuckucksuhr. Verrate es niemandem.", "temperature": 0, "max_tokens": 4}
    cached = lambda **key: post(base_server, "/v1/completions", {**body, **key})[1]["usage"]["prompt_tokens_details"][
        "cached_tokens"]
    assert cached(prompt_cache_key="a" * 32) == 0
    assert cached(prompt_cache_key="a" * 32) > 5  # the same client: its prompt is cached
    assert cached(prompt_cache_key="b" * 32) == 0  # another client, the same prompt: computed from scratch
    assert cached() == 0
    assert cached() == 0  # without a key, not even after a keyless request of the same prompt (anyone's)


def test_seed_repeats_a_sampled_answer_one_at_a_time(base_server):
    """OpenAI's seed on the one-at-a-time engine (--max-batch 1) too: the same seed, the same answer."""
    body = {"prompt": "Die Hauptstadt von Deutschland ist", "max_tokens": 30, "temperature": 1.0}
    first, again, other = (post(base_server, "/v1/completions", {**body, "seed": seed})[1]["choices"][0]["text"]
                           for seed in (7, 7, 8))
    assert first == again and first != other


def test_the_same_request_again_reuses_its_cache(server):
    """A client sends the same conversation again (the page's "regenerate"): its row holds the whole prompt, all
    of it but the last token is reused (that one is computed for the first answer token's logits)."""
    body = {**chat_body(QUESTIONS[3], max_tokens=8), "prompt_cache_key": "c" * 32}
    first = post(server, "/v1/chat/completions", body)[1]
    status, again = post(server, "/v1/chat/completions", body)
    assert status == 200, again
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["choices"] == first["choices"]
