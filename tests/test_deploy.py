"""deploy/: Debian's real nginx, with deploy/nginx/nanoschnack-proxy.conf as shipped, in front
of a real `python serve.py` on loopback ports. A streamed answer must arrive through the proxy
piece by piece: the server holds the stream after its first piece (a small launcher around
serve.main wraps serve.stream_answer) until the test has read that piece through nginx, so a
buffering proxy would fail the test, not just slow it down. The API key is enforced through it.
nginx runs as a non-daemon child with its own prefix, pid, logs and temp paths in tmp."""
import http.client
import json
import os
import select
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")

from conftest import REPO_ROOT, make_checkpoint
from test_serve import chat_body, free_port, wait_for

KEY = "sk-durch-den-proxy"
PROXY_CONF = REPO_ROOT / "deploy" / "nginx" / "nanoschnack-proxy.conf"

# serve.main with a hook that holds the first stream after its first piece of text until a line comes on
# stdin: the piece is handed to the socket, and nothing more is sent until the test has read it through nginx
LAUNCHER = """
import asyncio, json, sys, serve
stream_answer, streams = serve.stream_answer, []
async def held_stream_answer(*args, **kwargs):
    streams.append(1)
    first = len(streams) == 1
    async for chunk in stream_answer(*args, **kwargs):
        yield chunk
        if first and chunk.startswith("data: {") and json.loads(chunk[6:])["choices"][0]["delta"].get("content"):
            first = False
            print("held", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
serve.stream_answer = held_stream_answer
serve.main(sys.argv[1:])
"""

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream nanoschnack {{ server 127.0.0.1:{upstream}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        include {conf};
    }}
}}
"""


def readline_within(pipe, seconds: float) -> str:
    ready, _, _ = select.select([pipe], [], [], seconds)
    assert ready, f"no line from the server within {seconds} s"
    return pipe.readline().decode().strip()


@pytest.fixture
def stack(tmp_path, small_tokenizer):
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if not nginx:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it when it runs as root)")
    checkpoint = make_checkpoint(tmp_path / "ckpt", small_tokenizer, kind="chat", sequence_len=512)
    upstream, port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    serve_proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "--checkpoint", str(checkpoint), "--device", "cpu", "--port", str(upstream),
         "--api-key", KEY, "--trusted-proxy", "127.0.0.1", "--allowed-hosts", "localhost", "--log-level", "warning"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp_path, upstream=upstream, port=port, conf=PROXY_CONF))
    nginx_proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e",
                                   str(tmp_path / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def up():
        for proc, name in ((serve_proc, "serve.py"), (nginx_proc, "nginx")):
            if proc.poll() is not None:
                log.seek(0)
                errors = (tmp_path / "error.log").read_text() if (tmp_path / "error.log").exists() else ""
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{log.read()[-3000:]}\n{errors[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health", headers={"Host": "localhost"})
            return conn.getresponse().status == 200
        except OSError:
            return False

    try:
        wait_for(up, 180, "serve.py behind nginx to answer /health", interval=0.2)
        yield port, serve_proc
    finally:
        for proc in (nginx_proc, serve_proc):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, json.dumps(body) if body is not None else None,
                 {"Host": "localhost", "Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def test_streams_piece_by_piece_through_nginx_and_needs_the_key(stack):
    port, server = stack
    assert "proxy_buffering off;" in PROXY_CONF.read_text()  # what the page's streaming relies on
    for headers in ({}, {"Authorization": "Bearer sk-falsch"}):
        _, response = call(port, "POST", "/v1/chat/completions", chat_body("Hallo", max_tokens=5), headers)
        answer = json.loads(response.read())
        assert response.status == 401 and answer["error"]["code"] == "invalid_api_key", answer
    conn, response = call(port, "POST", "/v1/chat/completions", chat_body("Erzähl mir von Bern.", max_tokens=40,
                                                                           stream=True),
                          {"Authorization": f"Bearer {KEY}"})
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = []

    def next_event():
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                return line[6:]
        return None

    while True:  # until the first piece of text: it must come while the server holds the second
        event = next_event()
        assert event is not None and event != "[DONE]", "the stream ended before its first piece"
        events.append(json.loads(event))
        if events[-1]["choices"][0]["delta"].get("content"):
            break
    assert readline_within(server.stdout, 120) == "held"  # the server really sends nothing more yet
    server.stdin.write(b"go\n")
    server.stdin.flush()
    while (event := next_event()) not in (None, "[DONE]"):
        events.append(json.loads(event))
    conn.close()
    assert event == "[DONE]"
    pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    assert len([p for p in pieces if p]) >= 2 and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    _, response = call(port, "POST", "/v1/chat/completions", chat_body("Hallo", max_tokens=3),
                       {"Authorization": f"Bearer {KEY}"})
    assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] > 0
    _, response = call(port, "GET", "/metrics")  # with API keys, /metrics needs one too
    assert response.status == 401 and response.getheader("X-Content-Type-Options") == "nosniff"
    response.read()
    _, response = call(port, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status == 200 and 'nanoschnack_responses_total{status="401"} 3' in response.read().decode()
