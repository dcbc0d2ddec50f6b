"""
serve.py: nanoschnack on the web, an OpenAI-compatible API and a German chat page.

    pip install -e '.[web]'
    python serve.py --checkpoint out/chat                  # http://127.0.0.1:8000
    python serve.py --host 0.0.0.0 --port 8080 --device cuda:1

Endpoints:
    GET  /                     the chat page (web/index.html: one file, no build step, no CDN)
    POST /v1/chat/completions  OpenAI's chat API: messages, temperature, top_p, max_tokens, seed, stream
    POST /v1/completions       OpenAI's plain-text API: continue `prompt` (what a base model can do)
    GET  /v1/models            the one model served
    GET  /health               liveness, queue length and counters

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

Hardening (issue 20), each with a test in tests/test_serve.py:
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
- Every malformed request is a 4xx in OpenAI's shape, never a 500.

Access control (issue 18; access.py): --api-key / --api-key-file require a Bearer key on
/v1/*, the page chats through a signed session cookie instead, a key's requests only reuse
its own cache, and --rate-limit-requests / --rate-limit-tokens bound each client (per key,
else per address; X-Forwarded-For only from --trusted-proxy). deploy/ puts it behind nginx.
"""
import argparse
import asyncio
import base64
import collections
import hashlib
import json
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:
    raise SystemExit(f"error: serve.py needs the web extra ({e.name} is missing): pip install -e '.[web]'")

from access import (COOKIE, LOOPBACK_HOSTS, Access, Client, Denied, RateLimited, default_allowed_hosts, host_name,
                    read_key_file, timed_protocol)
from engine import (Engine, Job, QueueFull, RequestTimeout, completion_tokens, job_events, log,
                    make_engine)
from engine_process import EngineProcess
from session import MIN_TEMPERATURE, MIN_TOP_P, ChatSession, Reply, Sampling, fit_to_context, load_session
from tok import ConversationError, check_conversation

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; 0 is greedy
PING_SECONDS = 2.0  # while a streamed request waits, send an SSE comment this often
DISCONNECT_CHECK_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there
MAX_JSON_DEPTH = 32  # OpenAI's request bodies nest 5 deep; 1,000 would be a RecursionError


@dataclass
class Limits:
    """What one request may ask for; anything larger gets a 4xx that says which limit."""
    max_messages: int = 64
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000  # all messages together (or a completion prompt)
    max_tokens: int = 1024  # cap on max_tokens, and its value when a request names none
    max_queue: int = 16  # requests waiting behind the one being answered; more get 429
    request_seconds: float = 600.0  # a request's whole life, queue included; then 504 (or an SSE error)
    max_batch: int = 8  # answers generated together (continuous batching); 1: one at a time

    @property
    def max_body_bytes(self) -> int:
        # Room for max_total_chars even when every character is JSON-escaped as a
        # surrogate pair ("\ud83e\udd86", 12 bytes), plus the other fields.
        return 12 * self.max_total_chars + 65_536


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int = 1):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # for a 429: seconds to wait

    def body(self) -> dict:
        kind = {429: "rate_limit_error"}.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# -----------------------------------------------------------------------------
# Reading requests: every field checked, every problem a clear 4xx

class ClientGone(Exception):
    """The client hung up while sending its request: nobody is left to answer."""


def json_depth(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion to exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, depth)
            todo += [(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")  # json.loads would accept NaN and Infinity


async def read_json(request: Request, limit: int) -> dict:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        # A web page on another site can send text/plain or a form without asking the browser
        # first (no CORS preflight); application/json it cannot. So this refuses cross-site use.
        raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'}",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {int(length):,} bytes is larger than this server's limit of {limit:,} bytes",
                       code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():  # also bounds bodies sent without Content-Length
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is larger than this server's limit of {limit:,} bytes",
                               code="request_too_large")
    except ClientDisconnect:
        raise ClientGone(f"client {client_name(request)} hung up after {len(body):,} bytes of its request body")
    try:
        data = json.loads(body, parse_constant=no_constant)
    except RecursionError:
        data = None  # nested deeper than Python's stack: as too deep as below
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json")
    if data is None or json_depth(data) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests lists and objects deeper than {MAX_JSON_DEPTH} levels",
                       code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_type")
    return data


def client_name(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def shown(value) -> str:
    """A value for an error message, short whatever it is (a 400-digit number, a long string)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def number(data: dict, name: str, default, low: float, high: float, integer: bool = False):
    """data[name] (or default when absent or null), checked to be a finite number in [low, high]."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(422, f"{name} must be {'an integer' if integer else 'a number'}, got {shown(value)}",
                       param=name, code="invalid_type")
    if not low <= value <= high:  # also refuses inf (1e999 in JSON); NaN never gets here (no_constant)
        raise APIError(400, f"{name} must be between {low:g} and {high:g}, got {shown(value)}", param=name,
                       code="invalid_value")
    return value


def strict(data: dict, name: str, kind, what: str):
    """data[name] when it is exactly of `kind` (so true is no 1, and 1.0 no integer), else 422."""
    value = data.get(name)
    if value is not None and (type(value) is not kind):
        raise APIError(422, f"{name} must be {what}, got {shown(value)}", param=name, code="invalid_type")
    return value


def read_sampling(data: dict, defaults: Sampling, limits: Limits) -> tuple[Sampling, int | None]:
    """OpenAI's sampling fields (and vLLM's top_k) over the server's defaults; (sampling, seed).

    Temperatures below MIN_TEMPERATURE (and top_p below MIN_TOP_P) are greedy:
    there the most likely token gets all the probability anyway, and float32 cannot divide by them."""
    if strict(data, "n", int, "an integer") not in (None, 1):
        raise APIError(400, "n must be 1: this server gives one answer per request", param="n", code="invalid_value")
    if data.get("stop"):
        raise APIError(400, "stop sequences are not supported; the model stops at the end of its answer",
                       param="stop", code="unsupported_parameter")
    if data.get("logprobs"):
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    strict(data, "stream", bool, "true or false")
    if data.get("stream_options") is not None and not isinstance(data["stream_options"], dict):
        raise APIError(422, "stream_options must be an object", param="stream_options", code="invalid_type")
    both = data.get("max_tokens"), data.get("max_completion_tokens")
    if None not in both and both[0] != both[1]:
        raise APIError(400, f"max_tokens ({shown(both[0])}) and max_completion_tokens ({shown(both[1])}) disagree; "
                            f"send one of them", param="max_completion_tokens", code="invalid_value")
    name = "max_completion_tokens" if both[1] is not None else "max_tokens"
    max_tokens = data.get(name)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
        raise APIError(400, f"{name} is {shown(max_tokens)}, this server's limit is {limits.max_tokens} (--max-tokens)",
                       param=name, code="max_tokens_too_large")
    temperature = number(data, "temperature", defaults.temperature, *TEMPERATURE_RANGE)
    top_p = number(data, "top_p", defaults.top_p, 0.0, 1.0)
    top_k = number(data, "top_k", defaults.top_k, 0, 1_000_000, integer=True)
    if top_p == 0:  # the limit of nucleus sampling as top_p -> 0: only the most likely token
        temperature, top_p = 0.0, None
    sampling = Sampling(temperature=float(temperature), top_k=top_k or None, top_p=top_p,
                             max_new_tokens=number(data, name, limits.max_tokens, 1, limits.max_tokens, integer=True))
    return sampling, number(data, "seed", None, -2**63, 2**64 - 1, integer=True)


def read_cache_key(data: dict, shared: bool):
    """Whose KV cache this request may reuse: its prompt_cache_key (OpenAI's field), else nobody's
    (or everybody's with --shared-cache). A key is as secret as the client makes it: the page
    uses 128 random bits per chat."""
    key = data.get("prompt_cache_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
        raise APIError(422, "prompt_cache_key must be a string of 1 to 256 characters", param="prompt_cache_key",
                       code="invalid_type")
    return ("key", key) if key is not None else ("shared",) if shared else None


def text_of(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts, of which only text parts are allowed."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"message {i}: only text content is supported (parts of type 'text')",
                           param="messages", code="unsupported_content")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(422, f"message {i}: content must be a string, got {json.dumps(content)[:40]}",
                       param="messages", code="invalid_type")
    return content


def read_messages(data: dict, limits: Limits, system: str | None) -> list[dict]:
    """The conversation, within the limits and the chat template's rules (system?, user, assistant, ..., user)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise APIError(422, "messages must be a list of {\"role\", \"content\"} objects", param="messages",
                       code="invalid_type")
    if len(messages) > limits.max_messages:
        raise APIError(413, f"{len(messages)} messages, this server takes at most {limits.max_messages} "
                            f"(--max-messages); start a new chat", param="messages", code="too_many_messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(422, f"message {i} is not a {{\"role\", \"content\"}} object", param="messages",
                           code="invalid_type")
        content = text_of(m.get("content"), i)
        if len(content) > limits.max_message_chars:
            raise APIError(413, f"message {i} has {len(content):,} characters, at most {limits.max_message_chars:,} "
                                f"are allowed (--max-message-chars)", param="messages", code="message_too_long")
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name for system
        checked.append({"role": role, "content": content})
    total = sum(len(m["content"]) for m in checked)
    if total > limits.max_total_chars:
        raise APIError(413, f"the messages have {total:,} characters together, at most {limits.max_total_chars:,} "
                            f"are allowed (--max-total-chars); start a new chat", param="messages",
                       code="conversation_too_long")
    if system and checked and checked[0]["role"] != "system":
        checked.insert(0, {"role": "system", "content": system})
    try:
        return check_conversation(checked, ends_with="user")
    except ConversationError as e:
        raise APIError(400, str(e), param="messages", code="invalid_conversation")


def check_fits(session: ChatSession, messages: list[dict], sampling: Sampling) -> tuple[list, list[int]]:
    """The kept messages and the prompt's ids, as ChatSession.stream makes them; 413 when the
    last user message alone leaves no room for an answer (older turns are dropped silently)."""
    reserve = min(sampling.max_new_tokens, session.context_len // 2)
    try:
        return fit_to_context(session.tokenizer, messages, session.context_len - reserve)
    except ConversationError as e:
        raise APIError(413, f"{e} (context {session.context_len} tokens)", param="messages",
                       code="context_length_exceeded")


def read_prompt(data: dict, limits: Limits) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # OpenAI allows a batch of prompts; we take one
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(422, "prompt must be a non-empty string", param="prompt", code="invalid_type")
    if len(prompt) > limits.max_total_chars:
        raise APIError(413, f"prompt has {len(prompt):,} characters, at most {limits.max_total_chars:,} are allowed "
                            f"(--max-total-chars)", param="prompt", code="prompt_too_long")
    return prompt


# -----------------------------------------------------------------------------
# Writing answers in OpenAI's shapes

def usage(reply: Reply) -> dict:
    completion = completion_tokens(reply)
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}  # as OpenAI reports prompt caching


def failure(e: Exception) -> APIError:
    """What the client is told when its generation ended in an exception."""
    if isinstance(e, RequestTimeout):
        return APIError(504, f"{e} (the server took too long; try fewer max_tokens)", code="request_timeout")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Answer:
    """The fixed fields of one response and how its chunks look, for both endpoints."""

    def __init__(self, chat_mode: bool, model: str):
        self.chat_mode, self.model = chat_mode, model
        self.id = ("chatcmpl-" if chat_mode else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, reply: Reply) -> dict:
        if self.chat_mode:
            choice = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                      "finish_reason": reply.finish_reason}
        else:
            choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": reply.finish_reason}
        return {**self.head("chat.completion" if self.chat_mode else "text_completion"),
                "choices": [choice], "usage": usage(reply)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat_mode:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("chat.completion.chunk" if self.chat_mode else "text_completion"), "choices": [choice]}


async def stream_answer(engine: Engine, job: Job, answer: Answer, include_usage: bool):
    """Server-sent events: a role chunk, one chunk per text piece, a finish chunk, [DONE].

    Whatever ends this generator early (Starlette cancels it when the client
    disconnects) cancels the job, so the model moves on to the next request."""
    try:
        if answer.chat_mode:
            yield sse(answer.chunk(role=True))  # sent at once, so a queued client sees it is accepted
        async for kind, value in job_events(job, PING_SECONDS):
            if kind == "idle":
                yield ": waiting\n\n"  # an SSE comment: keeps proxies open, and notices a gone client
            elif kind == "piece":
                yield sse(answer.chunk(value))
            elif kind == "error":  # the status (200) is sent already: the error is an event
                yield sse(failure(value).body())
            elif kind == "done":
                yield sse(answer.chunk(finish_reason=value.finish_reason))
                if include_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
                    yield sse({**answer.head("chat.completion.chunk" if answer.chat_mode else "text_completion"),
                               "choices": [], "usage": usage(value)})
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)  # a no-op when the job has finished


async def whole_answer(engine: Engine, job: Job, answer: Answer, request: Request):
    """Wait for the whole answer. Nothing is sent meanwhile, so a client that leaves is only
    noticed by asking the server (uvicorn) now and then; then the job is cancelled."""
    checked = time.monotonic()
    try:
        async for kind, value in job_events(job, DISCONNECT_CHECK_SECONDS):
            if time.monotonic() - checked > DISCONNECT_CHECK_SECONDS:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({"error": "client disconnected"}, status_code=499)  # nobody reads it
            if kind == "error":
                raise failure(value)
            if kind == "done":
                return JSONResponse(answer.whole(value))
    finally:
        engine.cancel(job)


# -----------------------------------------------------------------------------
# In front of the app: the Host check, API keys, headers (read timeouts: access.py)

class Guard:
    """ASGI middleware: refuses Host names not in allowed_hosts (a page on attacker.example
    that rebinds its DNS name to this server's address still sends Host: attacker.example),
    says who a /v1/* request is (access.Access: 401 without a valid API key or page session
    when keys are set; the Client goes to request.state.client), and gives every response
    X-Content-Type-Options: nosniff."""

    def __init__(self, app, allowed_hosts: list[str], access: Access, statuses: collections.Counter | None = None):
        self.app, self.access, self.statuses = app, access, statuses
        self.allowed = None if "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            e = APIError(400, f"this server does not answer for host {shown(host)} (--allowed-hosts)",
                         code="invalid_host")
            return await JSONResponse(e.body(), status_code=400)(scope, receive, send)
        if scope["path"].startswith("/v1/"):
            peer = scope["client"][0] if scope.get("client") else "?"
            address = self.access.client_address(peer, headers.get(b"x-forwarded-for", b"").decode("latin-1"))
            cookies = Request(scope).cookies
            try:
                scope.setdefault("state", {})["client"] = self.access.identify(
                    address, headers.get(b"authorization", b"").decode("latin-1"), cookies.get(COOKIE))
            except Denied as denied:
                e = APIError(401, str(denied), code="invalid_api_key")
                return await JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                if self.statuses is not None:
                    self.statuses[message["status"]] += 1
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)
        await self.app(scope, receive, send_with_headers)


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
        headers = {"Retry-After": str(e.retry_after)} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request, e: ClientGone):
        log(str(e))  # one line: a client that leaves is normal, not a bug
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug: logged by uvicorn, answered in OpenAI's shape
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):  # unknown paths and methods, in the same shape
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    async def generate(request: Request, chat_mode: bool):
        deadline = time.monotonic() + limits.request_seconds
        if chat_mode and session.kind == "base":
            raise APIError(400, "this is a base model (pretrained only, no chat template): use POST /v1/completions "
                                "to continue text, or fine-tune it with sft.py", code="base_model")
        client: Client = request.state.client
        try:
            access.admit(client)
        except RateLimited as e:
            raise APIError(429, str(e), code="rate_limit_exceeded", retry_after=e.retry_after)
        data = await read_json(request, limits.max_body_bytes)
        sampling, seed = read_sampling(data, defaults, limits)
        cache_key = read_cache_key(data, shared_cache)
        if cache_key is not None and client.identity is not None:
            cache_key = (client.identity, *cache_key)  # one API key (or page session) never reuses another's cache
        if chat_mode:
            messages = read_messages(data, limits, system)
            # tokenizing a long conversation takes a while: not on the event loop, which serves everyone
            kept, ids = await asyncio.to_thread(check_fits, session, messages, sampling)
            job = Job(ids, sampling, seed, cache_key, deadline, session.chat_stop_ids, len(messages) - len(kept),
                      messages=messages)
        else:
            prompt = read_prompt(data, limits)
            # as ChatSession.complete: <|bos|> + text, which loses its beginning if too long
            room = session.context_len - min(sampling.max_new_tokens, session.context_len // 2)
            text_ids = await asyncio.to_thread(session.tokenizer.encode, prompt)
            ids = [session.tokenizer.bos_id] + text_ids[max(0, len(text_ids) + 1 - room):]
            job = Job(ids, sampling, seed, cache_key, deadline, session.base_stop_ids, text=prompt)
        job.on_finish = lambda tokens: access.charge(client, tokens)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full")
        answer = Answer(chat_mode, model_name)
        if not data.get("stream"):
            return await whole_answer(engine, job, answer, request)
        options = data.get("stream_options") or {}
        include_usage = options.get("include_usage") is True
        return StreamingResponse(stream_answer(engine, job, answer, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat_mode=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat_mode=False)

    @app.get("/v1/models")
    async def models():
        # OpenAI's fields first; kind, step and context_length are ours (the page reads kind).
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanoschnack", "kind": session.kind,
                                            "step": getattr(session, "step", None),
                                            "context_length": session.context_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "kind": session.kind, "device": str(session.device),
                "busy": engine.busy, "running": engine.running, "queued": engine.queued, **engine.counts,
                "limits": {**vars(limits), "temperature": TEMPERATURE_RANGE}}

    @app.get("/metrics")
    async def metrics():
        """Prometheus' text format: requests by status, queue, batch, tokens, TTFT and tokens/s."""
        m, c = engine.metrics, engine.counts
        lines = ["# TYPE nanoschnack_responses_total counter"]
        lines += [f'nanoschnack_responses_total{{status="{code}"}} {n}' for code, n in sorted(statuses.items())]
        lines += ["# TYPE nanoschnack_generations_total counter"]
        lines += [f'nanoschnack_generations_total{{outcome="{k}"}} {c[k]}'
                  for k in ("completed", "cancelled", "errors", "rejected", "timeouts")]
        lines += ["# TYPE nanoschnack_tokens_generated_total counter", f"nanoschnack_tokens_generated_total {c['completion_tokens']}",
                  "# TYPE nanoschnack_queue_length gauge", f"nanoschnack_queue_length {engine.queued}",
                  "# TYPE nanoschnack_running gauge", f"nanoschnack_running {engine.running}",
                  "# TYPE nanoschnack_time_to_first_token_seconds histogram", *m.ttft.lines("nanoschnack_time_to_first_token_seconds"),
                  "# TYPE nanoschnack_tokens_per_second histogram", *m.rate.lines("nanoschnack_tokens_per_second")]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page(request: Request):
        response = Response(html, media_type="text/html; charset=utf-8", headers=html_headers)
        if access.keys and access.session_of(request.cookies.get(COOKIE)) is None:
            # the page's own requests need no key: a signed session cookie (access.py says why that is safe)
            https = request.url.scheme == "https" or (request.client and access.is_trusted(request.client.host) and
                                                      request.headers.get("x-forwarded-proto") == "https")
            response.set_cookie(COOKIE, access.new_session(), path="/", httponly=True, samesite="strict",
                                secure=bool(https))
        return response

    return app


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
    p.add_argument("--api-key", action="append", default=[], help="require 'Authorization: Bearer KEY' on /v1/* "
                   "(repeat for several keys; the page and /health stay open); visible in `ps`, so prefer:")
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
    for name in ("header_timeout", "body_timeout", "request_timeout"):
        if not 0 < getattr(args, name) < math.inf:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be a positive number of seconds")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_tokens)
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
        session = load_session(args.checkpoint, args.device, sampling)
    else:  # this side needs the tokenizer and settings; the engine process loads the model on the device
        session = load_session(args.checkpoint, "cpu", sampling)
        engine = EngineProcess(session.checkpoint, args.device, limits.max_batch, limits.max_queue)
        session.model.to("meta")  # this side never runs it: its weights need no memory here
        session.device = engine.device
    app = create_app(session, limits, args.model_name, args.system, allowed, args.shared_cache, access, engine)
    mode = "chat" if session.kind == "chat" else "base model: completion mode only (/v1/completions)"
    print(f"nanoschnack: {session.checkpoint} (step {session.step}, {mode}), device {session.device}, "
          f"context {session.context_len} tokens; http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    if allowed == ["*"]:
        print("nanoschnack: any Host name is answered; name yours with --allowed-hosts", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5,
                                           http=timed_protocol(args.header_timeout, args.body_timeout)))
    if engine is not None:
        engine.on_exit = lambda: setattr(server, "should_exit", True)  # stop as on SIGTERM, then exit 1 below
    try:
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
