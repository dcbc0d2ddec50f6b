"""
serve.py: nanoschnack on the web, an OpenAI-compatible API and a German chat page.

    pip install -e '.[web]'
    python serve.py --checkpoint out/chat                  # http://127.0.0.1:8000
    python serve.py --host 0.0.0.0 --port 8080 --device cuda:1

Endpoints:
    GET  /                     the chat page (web/index.html: one file, no build step, no CDN)
    POST /v1/chat/completions  OpenAI's chat API: messages, temperature, top_p, max_tokens, stop, n, seed, stream
    POST /v1/completions       OpenAI's plain-text API: continue `prompt` (what a base model can do)
    GET  /v1/models            the one model served
    GET  /health               status (200 "ok"; 503 "stalled" or "stopping"), queue length and counters
    GET  /metrics              Prometheus' text format (with --api-key: needs a key)

How requests share the model: engine.py (a queue of jobs, one worker thread that owns
the model; one answer at a time with --max-batch 1, else continuous batching), run in an
engine process of its own unless --single-process. This file is the HTTP side: it reads and
checks requests, submits engine.Jobs, and writes their pieces as OpenAI's responses. One
server serves one model on one device; for several GPUs run one server per GPU
(--device cuda:N --port ...) behind a load balancer.

The session's KV cache is kept between requests, so the next turn of the same
conversation (the page sends the whole history each time) only prefills the new
message: chat.py reuses the longest common prefix of the cache and the prompt.

A base checkpoint (train.py, no chat template) is served in completion mode:
/v1/completions works, /v1/chat/completions answers 400 saying so, and the page
switches to continuing text.

Hardening (issue 20), each with a test in tests/test_serve.py or tests/test_serve_live.py:
- Read timeouts: a connection gets --header-timeout seconds for its request line
  and headers and --body-timeout for its body, else it is closed (uvicorn's h11
  protocol has only a keep-alive timeout, so TimedH11Protocol adds these); a
  request gets --request-timeout seconds in all, waiting in the queue included.
- The KV cache is only reused between requests of the same client: the same
  `prompt_cache_key` (OpenAI's field; the page sends a random one per chat).
  Otherwise a request could time how fast its prompt is answered and so guess
  another user's prompt prefix. --shared-cache opts back into reuse by everyone.
- /v1/* takes only Content-Type: application/json (else 415), so a web page on
  another site cannot make a visitor's browser run generations with a "simple"
  form POST; Host must be one of --allowed-hosts (DNS rebinding); no redirects.
- Every malformed request is a 4xx in OpenAI's shape, never a 500 (openai_api.py reads them).

Access control (issue 18; access.py): --api-key / --api-key-file require a Bearer key on
/v1/*, the page chats through a signed session cookie instead, a key's requests only reuse
its own cache, and --rate-limit-requests / --rate-limit-tokens bound each client (per key,
else per address; X-Forwarded-For only from --trusted-proxy). deploy/ puts it behind nginx.

Second round (issue 29): uvicorn's own proxy-header handling is off, so X-Forwarded-For and
-Proto count only from --trusted-proxy (the Guard below applies them, for the rate limits and
uvicorn's access log alike); --request-timeout is kept here whatever the engine does, and a
watchdog reports an engine process that stops making progress (/health 503 "stalled", /metrics);
/metrics needs an API key when keys are set; every response is counted and carries the
security headers; the token limit reserves an answer's tokens up front.
"""
import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import math
import re
import sys
import time
import traceback
from pathlib import Path

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise SystemExit(f"error: serve.py needs the web extra ({e.name} is missing): pip install -e '.[web]'")

from access import (COOKIE, LOOPBACK_HOSTS, Access, Client, Denied, RateLimited, Reservation, default_allowed_hosts,
                    host_name, read_key_file, timed_protocol)
from engine import FINAL, Job, QueueFull, RequestTimeout, load_engine_session, log, make_engine
from engine_process import STALL_SECONDS, EngineGone, EngineProcess
from openai_api import (TEMPERATURE_RANGE, Answer, APIError, ClientGone, Limits, check_fits, check_prompt_fits,
                        read_cache_key, read_json, read_messages, read_n, read_prompts, read_sampling, shown, sse, usage)
from session import ChatSession, Sampling, SystemTooLong, check_system, load_session

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
PING_SECONDS = 2.0  # while a streamed request waits, send an SSE comment this often
DISCONNECT_CHECK_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]  # on every response (the page adds its own)


# -----------------------------------------------------------------------------
# Waiting for an answer: its events, the deadline, the client

def failure(e: Exception) -> APIError:
    """What the client is told when its generation ended in an exception."""
    if isinstance(e, RequestTimeout):
        return APIError(504, f"{e} (the server took too long; try fewer max_tokens)", code="request_timeout")
    if isinstance(e, EngineGone):
        return APIError(503, f"{e}; try again in a moment", code="engine_unavailable", retry_after=5)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")


async def answer_events(job: Job, idle_seconds: float):
    """The job's events as they come; ("idle", None) after idle_seconds without one; and at the job's
    deadline ("error", RequestTimeout) whatever the engine does. An engine process that is stopped or
    stuck sends nothing, so --request-timeout is kept here, not only by the engine (which drops the job
    at the same deadline when it gets to it, and counts the timeout)."""
    while True:
        left = job.deadline - time.monotonic()
        if left <= 0:
            yield "error", RequestTimeout("the request took longer than --request-timeout")
            return
        try:
            async with asyncio.timeout(min(idle_seconds, left)):  # a cancelled get() loses no event
                kind, value = await job.events.get()
        except TimeoutError:
            yield "idle", None
            continue
        yield kind, value
        if kind in FINAL:
            return


async def all_events(jobs: list[Job], idle_seconds: float):
    """(i, kind, value): the events of jobs[i] (answer_events) for the n answers of one request, as they come,
    until each has had its last."""
    events = asyncio.Queue()

    async def forward(i: int, job: Job):
        try:
            async for kind, value in answer_events(job, idle_seconds):
                events.put_nowait((i, kind, value))
        except Exception as e:  # a bug: that answer fails, and the request does not wait for it forever
            events.put_nowait((i, "error", e))
    tasks = [asyncio.create_task(forward(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, kind, value = await events.get()
            left -= kind in FINAL
            yield i, kind, value
    finally:
        for task in tasks:
            task.cancel()


def let_go(engine, job: Job) -> None:
    """The answer is over for its client: cancel the job so the model moves on (a no-op when it has
    finished). Past its deadline the engine drops it anyway, as a timeout, so it is left to do that."""
    if time.monotonic() < job.deadline:
        engine.cancel(job)


async def stream_answer(engine, jobs: list[Job], answer: Answer, include_usage: bool):
    """Server-sent events: a role chunk for each answer, one chunk per text piece (its answer's index), a
    finish chunk for each, [DONE]. An error ends the request: its other answers stop.

    Whatever ends this generator early (Starlette cancels it when the client
    disconnects) cancels the jobs, so the model moves on to the next request."""
    replies = [None] * len(jobs)
    try:
        if answer.chat_mode:  # sent at once, so a queued client sees it is accepted
            for i in range(len(jobs)):
                yield sse(answer.chunk(role=True, index=i))
        async with contextlib.aclosing(all_events(jobs, PING_SECONDS)) as events:
            async for i, kind, value in events:
                if kind == "idle":
                    yield ": waiting\n\n"  # an SSE comment: keeps proxies open, and notices a gone client
                elif kind == "piece":
                    yield sse(answer.chunk(value, index=i))
                elif kind == "error":  # the status (200) is sent already: the error is an event
                    yield sse(failure(value).body())
                    break
                elif kind == "done":
                    replies[i] = value
                    yield sse(answer.chunk(finish_reason=value.finish_reason, index=i))
        if include_usage and None not in replies:  # OpenAI's stream_options.include_usage: a last chunk, no choices
            yield sse({**answer.head("chat.completion.chunk" if answer.chat_mode else "text_completion"),
                       "choices": [], "usage": usage(replies, answer.n)})
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            let_go(engine, job)


async def whole_answer(engine, jobs: list[Job], answer: Answer, request: Request, headers: dict):
    """Wait for the whole answers. Nothing is sent meanwhile, so a client that leaves is only
    noticed by asking the server (uvicorn) now and then; then the jobs are cancelled."""
    checked, replies = time.monotonic(), [None] * len(jobs)
    try:
        async with contextlib.aclosing(all_events(jobs, DISCONNECT_CHECK_SECONDS)) as events:
            async for i, kind, value in events:
                if time.monotonic() - checked > DISCONNECT_CHECK_SECONDS:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({"error": "client disconnected"}, status_code=499)  # nobody reads it
                if kind == "error":
                    raise failure(value)
                if kind == "done":
                    replies[i] = value
        if None in replies:  # cancelled before it ran: only a gone client's jobs are
            return JSONResponse({"error": "client disconnected"}, status_code=499)
        return JSONResponse(answer.whole(replies), headers=headers)
    finally:
        for job in jobs:
            let_go(engine, job)


def settle_when_done(job: Job, reservation: Reservation) -> None:
    """Give back what the job's answer did not use of its token reservation: on_finish settles with the
    tokens generated; a job that ends without generating (cancelled while waiting, failed, the engine
    gone) gives back all of it with its last event. settle() counts only its first call."""
    job.on_finish = reservation.settle
    deliver = job.deliver

    def deliver_and_settle(event):
        if event[0] in FINAL:
            reservation.settle(0)
        deliver(event)
    job.deliver = deliver_and_settle


def answer_seed(seed: int | None, i: int) -> int | None:
    """The seed of answer i of a request's n: OpenAI's seed for the first, the next ones for the others, so a
    seeded request gives n different answers, the same ones each time (torch takes seeds modulo 2**64)."""
    return seed if seed is None or i == 0 else (seed + i) % 2**64


def submit_all(engine, jobs: list[Job], reservations: list[Reservation]) -> None:
    """Queue a request's jobs, each to settle its share of the request's token reservation: all of them, or
    none (429 when the queue is full, after cancelling those already queued)."""
    for job, reservation in zip(jobs, reservations):
        settle_when_done(job, reservation)
    queued = []
    try:
        for job in jobs:
            engine.submit(job)
            queued.append(job)
    except (QueueFull, EngineGone) as e:
        for job in queued:
            engine.cancel(job)
        for reservation in reservations:
            reservation.settle(0)
        raise APIError(429, str(e), code="queue_full") if isinstance(e, QueueFull) else failure(e)


def engine_state(engine) -> tuple[str, float]:
    """("ok" | "stalled" | "stopping", seconds since the engine last made progress). Only an engine
    process has a watchdog (EngineProcess); the engines in this process (--single-process) report "ok"."""
    if getattr(engine, "died", False):
        return "stopping", 0.0
    quiet = getattr(engine, "quiet_seconds", 0.0)
    return ("stalled" if getattr(engine, "stalled", False) else "ok"), quiet


# -----------------------------------------------------------------------------
# In front of the app: the Host check, API keys, proxies, headers (read timeouts: access.py)

class Guard:
    """ASGI middleware around everything the app answers:
    - refuses Host names not in allowed_hosts (a page on attacker.example that rebinds its DNS
      name to this server's address still sends Host: attacker.example): 400;
    - takes the client's address and scheme from X-Forwarded-For/-Proto when the peer is a
      --trusted-proxy, and from nobody else (uvicorn's own handling is off: uvicorn_config), and
      puts them in the scope, where the rate limits, the page's cookie and uvicorn's access log read them;
    - says who a /v1/* request is (access.Access: 401 without a valid API key or page session when
      keys are set; the Client goes to request.state.client), and /metrics needs a key, not a page session;
    - counts every response by status and gives each SECURITY_HEADERS, its own 400s and 401s and a
      500 for a bug included (answered here, so that they pass through this too)."""

    def __init__(self, app, allowed_hosts: list[str], access: Access, statuses: collections.Counter):
        self.app, self.access, self.statuses = app, access, statuses
        self.allowed = None if "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counted_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.statuses[message["status"]] += 1
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            refusal = self.check(scope)
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            await self.app(scope, receive, counted_send)
        except Exception as e:  # a bug: logged with its traceback, answered in OpenAI's shape
            if started:
                raise  # the status is sent: only uvicorn can end the response (it logs the error)
            log(f"internal error on {scope.get('method')} {scope.get('path')}:\n{traceback.format_exc().rstrip()}")
            error = APIError(500, f"internal error: {type(e).__name__}")
            await JSONResponse(error.body(), status_code=500)(scope, receive, counted_send)

    def check(self, scope) -> Response | None:
        """None when the request may go on, else the response that refuses it."""
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            e = APIError(400, f"this server does not answer for host {shown(host)} (--allowed-hosts)",
                         code="invalid_host")
            return JSONResponse(e.body(), status_code=400)
        peer = scope["client"][0] if scope.get("client") else "?"
        if self.access.is_trusted(peer):
            forwarded = b", ".join(v for k, v in scope["headers"] if k == b"x-forwarded-for").decode("latin-1")
            if forwarded:
                scope["client"] = (self.access.client_address(peer, forwarded), 0)
            if headers.get(b"x-forwarded-proto") in (b"http", b"https"):
                scope["scheme"] = headers[b"x-forwarded-proto"].decode()
        path = scope["path"]
        if path.startswith("/v1/") or path == "/metrics":
            cookie = Request(scope).cookies.get(COOKIE) if path != "/metrics" else None
            try:
                scope.setdefault("state", {})["client"] = self.access.identify(
                    scope["client"][0] if scope.get("client") else "?",
                    headers.get(b"authorization", b"").decode("latin-1"), cookie, page=path != "/metrics")
            except Denied as denied:
                e = APIError(401, str(denied), code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None


def page_headers(html: str) -> dict:
    """Security headers for the page. Its CSP allows exactly its own inline <script> and
    <style> (by hash), requests to this server only, and no framing by other sites."""
    def hashes(tag):
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
                        for m in re.findall(rf"^<{tag}>(.*?)</{tag}>", html, re.S | re.M))
    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           f"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


def too_many(e: RateLimited) -> APIError:
    return APIError(429, str(e), code="rate_limit_exceeded", retry_after=e.retry_after)


# -----------------------------------------------------------------------------
# The app

def create_app(session: ChatSession, limits: Limits | None = None, model_name: str = "nanoschnack",
               system: str | None = None, allowed_hosts: list[str] = LOOPBACK_HOSTS,
               shared_cache: bool = False, access: Access | None = None, engine=None) -> FastAPI:
    """The FastAPI app serving `session`. Tests and other programs can mount or run it themselves.
    `access`: API keys, trusted proxies and rate limits (default: an open API, no limits).
    `engine`: what generates (main() passes an engine_process.EngineProcess); default: an engine in this
    process, on session's model, with limits.max_batch rows."""
    limits = limits or Limits()
    access = access or Access()
    if engine is None:
        engine = make_engine(session, limits.max_batch, limits.max_queue)
    defaults = session.sampling
    app = FastAPI(title="nanoschnack", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # /health/ is a 404, not a redirect to http://<any Host>/health
    statuses = collections.Counter()  # HTTP responses by status code, for /metrics
    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts), access=access, statuses=statuses)
    app.state.engine, app.state.access = engine, access
    created = int(Path(session.checkpoint).stat().st_mtime) if getattr(session, "checkpoint", None) else 0
    html = PAGE.read_text(encoding="utf-8")
    html_headers = page_headers(html)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        headers = {"Retry-After": str(e.retry_after)} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request, e: ClientGone):
        log(str(e))  # one line: a client that leaves is normal, not a bug
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):  # unknown paths and methods, in the same shape
        # e.headers carries what the status needs, such as a 405's Allow (RFC 9110 requires it)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code, headers=e.headers)

    async def generate(request: Request, chat_mode: bool):
        deadline = time.monotonic() + limits.request_seconds
        if chat_mode and session.kind == "base":
            raise APIError(400, "this is a base model (pretrained only, no chat template): use POST /v1/completions "
                                "to continue text, or fine-tune it with sft.py", code="base_model")
        client: Client = request.state.client
        try:
            access.admit(client)  # before reading: a client over its limits costs no more than this
        except RateLimited as e:
            raise too_many(e)
        data = await read_json(request, limits.max_body_bytes)
        sampling, seed = read_sampling(data, defaults, limits)
        cache_key = read_cache_key(data, shared_cache)
        if cache_key is not None and client.identity is not None:
            cache_key = (client.identity, *cache_key)  # one API key (or page session) never reuses another's cache
        headers = {}
        if chat_mode:
            messages = read_messages(data, limits, system)
            # tokenizing a long conversation takes a while: not on the event loop, which serves everyone
            kept, ids = await asyncio.to_thread(check_fits, session, messages, sampling)
            if len(kept) < len(messages):  # the oldest exchanges did not fit: the answer is to the rest
                headers["X-Dropped-Messages"] = str(len(messages) - len(kept))
            n = read_n(data, limits)
            jobs = [Job(ids, sampling, answer_seed(seed, i), cache_key, deadline, session.chat_stop_ids,
                        len(messages) - len(kept), messages=messages) for i in range(n)]
        else:
            prompts = read_prompts(data, limits)
            n = read_n(data, limits, len(prompts))
            encoded = await asyncio.to_thread(lambda: [check_prompt_fits(session, p, sampling) for p in prompts])
            jobs = [Job(ids, sampling, answer_seed(seed, i), cache_key, deadline, session.base_stop_ids, text=prompt)
                    for prompt, ids in zip(prompts, encoded) for i in range(n)]
        try:  # the most these answers can generate is taken now, what they leave is given back at their ends
            reservation = access.reserve(client, sum(min(sampling.max_new_tokens, session.context_len - len(job.prompt))
                                                     for job in jobs))
        except RateLimited as e:
            raise too_many(e)
        submit_all(engine, jobs, reservation.split(len(jobs)))
        answer = Answer(chat_mode, model_name, n)
        if not data.get("stream"):
            return await whole_answer(engine, jobs, answer, request, headers)
        options = data.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        return StreamingResponse(stream_answer(engine, jobs, answer, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat_mode=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat_mode=False)

    def model_object() -> dict:
        # OpenAI's fields first; kind, step and context_length are ours (the page reads kind).
        return {"id": model_name, "object": "model", "created": created, "owned_by": "nanoschnack",
                "kind": session.kind, "step": getattr(session, "step", None), "context_length": session.context_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model:path}")  # OpenAI's "retrieve model" (client.models.retrieve); a name may hold "/"
    async def model(model: str):
        if model != model_name:
            raise APIError(404, f"no model {model!r} here: this server serves {model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        return model_object()

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what some load balancers and uptime checks send
    async def health():
        """200 and status "ok"; 503 (what load balancers take out of rotation) with "stalled" while the
        engine process makes no progress (engine_process.EngineProcess's watchdog), or "stopping" when
        it has exited and serve.py is about to."""
        state, quiet = engine_state(engine)
        return JSONResponse({"status": state, "model": model_name, "kind": session.kind,
                             "device": str(session.device), "busy": engine.busy, "running": engine.running,
                             "queued": engine.queued, "seconds_since_progress": round(quiet, 1), **engine.counts,
                             "limits": {**vars(limits), "temperature": TEMPERATURE_RANGE}},
                            status_code=200 if state == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        """Prometheus' text format: responses by status, generations, tokens, queue, batch, the engine's
        watchdog, TTFT and tokens/s. With API keys, it needs one (Guard)."""
        m, c = engine.metrics, engine.counts
        state, quiet = engine_state(engine)
        lines = ["# TYPE nanoschnack_responses_total counter"]
        lines += [f'nanoschnack_responses_total{{status="{code}"}} {n}' for code, n in sorted(statuses.items())]
        lines += ["# TYPE nanoschnack_generations_total counter"]
        lines += [f'nanoschnack_generations_total{{outcome="{k}"}} {c[k]}'
                  for k in ("completed", "cancelled", "errors", "rejected", "timeouts")]
        lines += ["# TYPE nanoschnack_tokens_generated_total counter", f"nanoschnack_tokens_generated_total {c['completion_tokens']}",
                  "# TYPE nanoschnack_queue_length gauge", f"nanoschnack_queue_length {engine.queued}",
                  "# TYPE nanoschnack_running gauge", f"nanoschnack_running {engine.running}",
                  "# TYPE nanoschnack_engine_stalled gauge", f"nanoschnack_engine_stalled {int(state != 'ok')}",
                  "# TYPE nanoschnack_engine_seconds_since_progress gauge",
                  f"nanoschnack_engine_seconds_since_progress {quiet:.3f}",
                  "# TYPE nanoschnack_time_to_first_token_seconds histogram", *m.ttft.lines("nanoschnack_time_to_first_token_seconds"),
                  "# TYPE nanoschnack_tokens_per_second histogram", *m.rate.lines("nanoschnack_tokens_per_second")]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page(request: Request):
        response = Response(html, media_type="text/html; charset=utf-8", headers=html_headers)
        if access.keys and access.session_of(request.cookies.get(COOKIE)) is None:
            # the page's own requests need no key: a signed session cookie (access.py says why that is safe)
            # (the scheme is https behind a --trusted-proxy that says so: Guard)
            response.set_cookie(COOKIE, access.new_session(), path="/", httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    return app


def uvicorn_config(app, host: str, port: int, log_level: str = "info", header_timeout: float = 10.0,
                   body_timeout: float = 30.0) -> uvicorn.Config:
    """How serve.py runs uvicorn (tests run their servers so too). proxy_headers=False: uvicorn would
    otherwise believe X-Forwarded-For from any loopback peer (its default forwarded_allow_ips), so a
    local client could name a new address per request; Guard applies it from --trusted-proxy only."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, proxy_headers=False,
                          timeout_graceful_shutdown=5, http=timed_protocol(header_timeout, body_timeout))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve nanoschnack: an OpenAI-compatible API and a German chat page.")
    p.add_argument("--checkpoint", help="checkpoint file or folder (its newest); default: out/chat, else out/base")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only; "
                                                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default %(default)s")
    p.add_argument("--allowed-hosts", default=None, help="comma-separated names the Host header may carry, * for "
                                                         "any (default: what --host implies: 127.0.0.1,localhost,"
                                                         "[::1] for loopback, * for 0.0.0.0)")
    p.add_argument("--model-name", default="nanoschnack", help="the model id in responses (requests may name any)")
    p.add_argument("--system", default=None, help="system message for requests that bring none")
    p.add_argument("--shared-cache", action="store_true", help="let requests without a prompt_cache_key reuse each "
                                                               "other's KV cache (faster, but a client can time "
                                                               "guesses of another's prompt)")
    d = Sampling()
    p.add_argument("--temperature", type=float, default=d.temperature, help="when a request names none (%(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="when a request names none, 0 = off (%(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="when a request names none, 1 = off (%(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                   help="when a request names none: -2 to 2, per time a token was already generated (%(default)s)")
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty,
                   help="when a request names none: -2 to 2, once for every token already generated (%(default)s)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size,
                   help="when a request names none: n > 0 forbids repeating n tokens of the answer (%(default)s)")
    L = Limits()
    p.add_argument("--max-tokens", type=int, default=L.max_tokens, help="cap on a request's max_tokens, and the "
                                                                        "default (%(default)s)")
    p.add_argument("--max-messages", type=int, default=L.max_messages, help="per request (%(default)s)")
    p.add_argument("--max-message-chars", type=int, default=L.max_message_chars, help="per message (%(default)s)")
    p.add_argument("--max-total-chars", type=int, default=L.max_total_chars, help="per request (%(default)s)")
    p.add_argument("--max-queue", type=int, default=L.max_queue, help="requests waiting for the model; more get "
                                                                      "429 (%(default)s)")
    p.add_argument("--max-batch", type=int, default=L.max_batch, help="answers generated together (continuous "
                                                                      "batching); 1 = one at a time (%(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's line and headers "
                                                                      "(%(default)s)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's body (%(default)s)")
    p.add_argument("--request-timeout", type=float, default=L.request_seconds,
                   help="seconds a request may take in all, waiting for the model included (%(default)s)")
    p.add_argument("--stall-timeout", type=float, default=STALL_SECONDS, help="seconds the engine process may "
                   "make no progress (no token, no message) before /health says 'stalled' with 503 (%(default)s)")
    p.add_argument("--api-key", action="append", default=[], help="require 'Authorization: Bearer KEY' on /v1/* "
                   "and /metrics (repeat for several keys; the page and /health stay open); visible in `ps`, so "
                   "prefer:")
    p.add_argument("--api-key-file", help="file with one API key per line (# comments)")
    p.add_argument("--trusted-proxy", action="append", default=[], help="address or network (CIDR) of a reverse "
                   "proxy whose X-Forwarded-For is believed (repeatable; default: none)")
    p.add_argument("--rate-limit-requests", type=int, default=0, help="requests per minute per client (API key, "
                   "else address); 0 = off (%(default)s)")
    p.add_argument("--rate-limit-tokens", type=int, default=0, help="generated tokens per minute per client; "
                   "0 = off (%(default)s)")
    p.add_argument("--single-process", action="store_true", help="run the model in this process too, not in an "
                   "engine process of its own: the HTTP side then takes turns with it on one interpreter lock "
                   "(fewer tokens/s with many clients; simpler to debug)")
    p.add_argument("--log-level", default="info", help="uvicorn's (default %(default)s; 'warning' hides each request)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    limits = Limits(args.max_messages, args.max_message_chars, args.max_total_chars, args.max_tokens, args.max_queue,
                    args.request_timeout, args.max_batch)
    if min(vars(limits).values()) < 1:
        raise SystemExit(f"error: every limit must be at least 1, got {limits}")
    for name in ("header_timeout", "body_timeout", "request_timeout", "stall_timeout"):
        if not 0 < getattr(args, name) < math.inf:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive number of seconds")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_tokens, args.frequency_penalty,
                            args.presence_penalty, args.no_repeat_ngram_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    allowed = args.allowed_hosts.split(",") if args.allowed_hosts else default_allowed_hosts(args.host)
    keys = list(args.api_key)
    try:
        keys += read_key_file(args.api_key_file) if args.api_key_file else []
        access = Access(keys, [p for arg in args.trusted_proxy for p in arg.split(",")], args.rate_limit_requests,
                        args.rate_limit_tokens)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if args.api_key_file and not keys:
        raise SystemExit(f"error: --api-key-file {args.api_key_file} holds no key")
    if min(args.rate_limit_requests, args.rate_limit_tokens) < 0:
        raise SystemExit("error: rate limits must be 0 (off) or positive")
    engine = None
    if args.single_process:
        session = load_engine_session(args.checkpoint, args.device, limits.max_batch, sampling)
    else:  # this side needs the tokenizer and settings, not the weights: the engine process loads those
        session = load_session(args.checkpoint, "meta", sampling)
    try:  # else every request that brings no system message of its own would be refused as too long
        check_system(session, args.system if session.kind == "chat" else None)
    except SystemTooLong as e:
        raise SystemExit(f"error: --system: {e}; shorten it, or lower --max-tokens")
    if not args.single_process:
        engine = EngineProcess(session.checkpoint, args.device, limits.max_batch, limits.max_queue,
                               args.stall_timeout)
        session.device = engine.device
    app = create_app(session, limits, args.model_name, args.system, allowed, args.shared_cache, access, engine)
    mode = "chat" if session.kind == "chat" else "base model: completion mode only (/v1/completions)"
    print(f"nanoschnack: {session.checkpoint} (step {session.step}, {mode}), device {session.device}, "
          f"context {session.context_len} tokens; http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    if allowed == ["*"]:
        print("nanoschnack: any Host name is answered; name yours with --allowed-hosts", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level, args.header_timeout,
                                           args.body_timeout))
    if engine is not None:  # stop as on SIGTERM, then exit 1 below; at once if the engine process died already
        engine.set_on_exit(lambda: setattr(server, "should_exit", True))
    try:
        if not server.should_exit:
            server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it has handled; uvicorn.run() swallows it so too
        pass
    finally:
        if engine is not None:
            engine.close()
    if engine is not None and engine.died:
        raise SystemExit("error: the engine process exited; serve.py stopped with it")


if __name__ == "__main__":
    main()
