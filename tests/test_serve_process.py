"""serve.py's engine process (its default): a stalled or dead engine, Ctrl-C and systemd's stop, and an
engine that cannot start. Split from tests/test_serve.py, whose helpers these tests share; each starts its
own server.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="the web extra is not installed: pip install -e '.[web]'")

from conftest import REPO_ROOT, make_checkpoint, sigint_as_in_a_shell
from test_serve import QUESTIONS, Server, Stream, chat_body, free_port, get, health_when, request, user, wait_for


def engine_process_of(pid: int) -> int:
    """The pid of serve.py's engine process (multiprocessing's spawned child; not its resource tracker)."""
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
            return int(child)
    raise AssertionError(f"serve.py (pid {pid}) has no engine process")


def metric(url, name: str) -> float:
    text = request(url, "GET", "/metrics")[2]
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP): state T in /proc."""
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"


STALL_REQUEST_TIMEOUT = 8  # --request-timeout of the stalled engine's server: an 8-token answer takes well under it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine process through /proc")
def test_a_stalled_or_dead_engine_process(tmp_path, small_tokenizer):
    """Stopped (SIGSTOP): /health says "stalled" with 503 and /metrics says so; the open requests, one a
    conversation longer than the command pipe holds, get their 504 and their SSE error at --request-timeout
    while the engine process is still stopped (they waited until it resumed); resumed, it is "ok" again.
    Killed: the open request fails, a request that arrives before serve.py has stopped gets a clean 503
    (it was a 500), and serve.py exits with 1 for systemd to restart it."""
    server = Server(make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=256),
                    ["--max-batch", "1", "--rate-limit-tokens", "1", "--trusted-proxy", "127.0.0.1", "--request-timeout",
                     str(STALL_REQUEST_TIMEOUT), "--stall-timeout", "3", "--log-level", "warning"], tmp_path)
    client = lambda n: {"X-Forwarded-For": f"10.0.0.{n}"}
    try:
        status, _, answer = request(server.url, "POST", "/v1/chat/completions", chat_body(QUESTIONS[0], max_tokens=8),
                                    client(1))
        assert status == 200 and answer["usage"]["completion_tokens"] > 0  # the one-at-a-time engine, over there
        # its generated tokens came back to the rate limit: client 1 owes tokens now
        status, _, answer = request(server.url, "POST", "/v1/chat/completions", chat_body(QUESTIONS[0]), client(1))
        assert status == 429 and "--rate-limit-tokens" in answer["error"]["message"], answer
        engine_pid = engine_process_of(server.proc.pid)

        os.kill(engine_pid, signal.SIGSTOP)
        turns = [{"role": r, "content": "€" * n} for r, n in (("user", 8000), ("assistant", 8000), ("user", 8000),
                                                                  ("assistant", 7000))]
        long_chat = {**chat_body(""), "messages": turns + user("Hallo"), "max_tokens": 8}  # ~93 KB as a job
        result = {}
        whole = threading.Thread(target=lambda: result.update(
            answer=request(server.url, "POST", "/v1/chat/completions", long_chat, client(2))))
        whole.start()
        stream = Stream(server.url, chat_body(QUESTIONS[1], max_tokens=8), headers=client(3))
        h = health_when(server.url, lambda h: h["status"] == "stalled" and h["queued"] == 2, "/health to say stalled")
        assert request(server.url, "GET", "/health")[0] == 503 and h["seconds_since_progress"] >= 3
        assert metric(server.url, "nanoschnack_engine_stalled") == 1
        events = list(stream.events())
        stream.close()
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout", events[-3:]
        whole.join(120)
        status, _, answer = result["answer"]
        assert status == 504 and answer["error"]["code"] == "request_timeout", answer
        assert stopped(engine_pid), "the answers must come while the engine process is stopped"
        os.kill(engine_pid, signal.SIGCONT)  # it drops both jobs, past their deadline, as timeouts
        health_when(server.url, lambda h: h["status"] == "ok" and h["timeouts"] == 2 and h["queued"] == 0,
                    "the engine process to recover")
        assert metric(server.url, "nanoschnack_engine_stalled") == 0
        assert "made no progress for" in server.output() and "makes progress again" in server.output()

        os.kill(engine_pid, signal.SIGSTOP)  # frozen: the next request is accepted, and then waits
        stream = Stream(server.url, chat_body(QUESTIONS[1], max_tokens=8), headers=client(4))
        events = stream.events()
        assert stream.status == 200 and next(events)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        # a request under way when the engine process dies: 100 Continue says the app is reading its body
        late = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        body = json.dumps(chat_body(QUESTIONS[2], max_tokens=8)).encode()
        late.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nX-Forwarded-For: 10.0.0.5\r\n\r\n".encode())
        assert late.recv(4096).startswith(b"HTTP/1.1 100 ")
        os.kill(engine_pid, signal.SIGKILL)
        rest = list(events)
        assert rest[-1] == "[DONE]" and "the engine process exited" in rest[-2]["error"]["message"], rest
        assert rest[-2]["error"]["code"] == "engine_unavailable"
        wait_for(lambda: "failing 1 open requests and stopping" in server.output(), 60, "serve.py to fail the request")
        late.sendall(body)
        response = http.client.HTTPResponse(late)
        response.begin()
        answer = json.loads(response.read())
        late.close()
        assert response.status == 503 and answer["error"]["code"] == "engine_unavailable", answer
        assert response.getheader("X-Content-Type-Options") == "nosniff" and response.getheader("Retry-After")
        assert server.proc.wait(60) == 1  # systemd's Restart=on-failure starts it again
        assert "error: the engine process exited; serve.py stopped with it" in server.output()
        assert "Traceback" not in server.output()
    finally:
        server.stop()


# serve.py, its engine process killed (as by the OOM killer) after it said "ready" and before serve.py asked
# to hear of its end: while create_app runs. The kill waits until serve.py has seen the death (_engine_gone).
DIES_WHILE_STARTING = """
import os, signal, sys, threading
import serve
create_app = serve.create_app

def create_app_as_the_engine_process_dies(*args):
    engine = args[-1]
    gone, engine_gone = threading.Event(), engine._engine_gone
    engine._engine_gone = lambda: (engine_gone(), gone.set())
    os.kill(engine.process.pid, signal.SIGKILL)
    assert gone.wait(120), "serve.py did not notice that the engine process died"
    return create_app(*args)
serve.create_app = create_app_as_the_engine_process_dies
serve.main(sys.argv[1:])
"""


def test_an_engine_process_that_dies_while_serve_py_starts_stops_it(tmp_path, small_tokenizer):
    """It used to start serving anyway and never exit: every request a 503, /health "stopping" for good, and
    systemd's Restart=on-failure never came. Now it exits with 1 at once, without serving."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=256)
    proc = subprocess.Popen([sys.executable, "-c", DIES_WHILE_STARTING, "--checkpoint", str(checkpoint), "--device",
                             "cpu", "--port", str(free_port())], stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        for line in proc.stderr:  # until serve.py exits, or starts serving with its engine dead
            lines.append(line)
            assert "Uvicorn running on" not in line, "serve.py serves with a dead engine process:\n" + "".join(lines)
        assert proc.wait(60) == 1, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert "the engine process exited (code -9)" in output and "Traceback" not in output, output
    assert lines[-1].startswith("error: the engine process exited; serve.py stopped with it"), output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine process through /proc")
@pytest.mark.parametrize("sig, exit_code", [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)])
def test_ctrl_c_and_systemd_stop_end_both_processes_cleanly(tmp_path, small_tokenizer, sig, exit_code):
    """Ctrl-C in a terminal and `systemctl stop` signal every process of the group: serve.py stops as
    uvicorn does (exit 0 after Ctrl-C; after SIGTERM uvicorn dies of the signal it re-raises), the
    engine process with it, and neither prints a traceback nor takes the other for dead."""
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=256)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--checkpoint", str(checkpoint), "--device",
                             "cpu", "--port", str(port), "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            preexec_fn=sigint_as_in_a_shell)

    def up():
        try:
            return get(f"http://127.0.0.1:{port}", "/health")[0] == 200
        except OSError:
            assert proc.poll() is None, proc.communicate()[1]
            return False

    def ended(pid):  # gone, or a zombie nobody reaped yet (whoever adopted it)
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    try:
        wait_for(up, 180, "serve.py to start", interval=0.2)
        engine_pid = engine_process_of(proc.pid)
        os.killpg(proc.pid, sig)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == exit_code and "Traceback" not in stderr and "engine process exited" not in stderr, stderr
    wait_for(lambda: ended(engine_pid), 30, "the engine process to end")


def test_an_engine_process_that_cannot_start_is_one_error_line(tmp_path, small_tokenizer):
    checkpoint = make_checkpoint(tmp_path, small_tokenizer, kind="chat", sequence_len=256)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "serve.py"), "--checkpoint", str(checkpoint), "--device",
                           "nonsense", "--port", str(free_port())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown device 'nonsense'"), proc.stderr
