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

How requests share the model. A model and its KV cache serve one generation at
a time, so one worker thread owns them (chat.py's ChatSession) and takes jobs
from a FIFO queue; the event loop only parses requests and forwards text pieces.
Each job gets its own asyncio queue, which the worker fills through
`loop.call_soon_threadsafe`: pieces of two answers can never mix, and a slow
generation never blocks other requests from being answered with 4xx, /health
or the page. A job whose client goes away is marked cancelled: the worker stops
it before the next token (or skips it while it still waits) and moves on. One
process serves one model on one device; for several GPUs run one server per GPU
(--device cuda:N --port ...) behind a load balancer.

The session's KV cache is kept between requests, so the next turn of the same
conversation (the page sends the whole history each time) only prefills the new
message: chat.py reuses the longest common prefix of the cache and the prompt.

A base checkpoint (train.py, no chat template) is served in completion mode:
/v1/completions works, /v1/chat/completions answers 400 saying so, and the page
switches to continuing text.
"""
import argparse
import asyncio
import collections
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:
    raise SystemExit(f"error: serve.py needs the web extra ({e.name} is missing): pip install -e '.[web]'")

import chat
from tok import ConversationError, check_conversation

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; 0 is greedy
PING_SECONDS = 2.0  # while a streamed request waits, send an SSE comment this often
DISCONNECT_CHECK_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there


@dataclass
class Limits:
    """What one request may ask for; anything larger gets a 4xx that says which limit."""
    max_messages: int = 64
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000  # all messages together (or a completion prompt)
    max_tokens: int = 1024  # cap on max_tokens, and its value when a request names none
    max_queue: int = 16  # requests waiting behind the one being answered; more get 429

    @property
    def max_body_bytes(self) -> int:
        # Room for max_total_chars even when every character is JSON-escaped as a
        # surrogate pair ("\ud83e\udd86", 12 bytes), plus the other fields.
        return 12 * self.max_total_chars + 65_536


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# -----------------------------------------------------------------------------
# The model worker: one thread, one generation at a time, jobs in FIFO order

class Job:
    """One request's generation. The worker reports to the event loop through `events`:
    ("piece", text)..., then ("done", chat.Reply) or ("error", exception)."""

    def __init__(self, loop, generate, seed: int | None):
        self.generate = generate  # session -> iterator of text pieces (ChatSession.stream or .complete)
        self.seed = seed
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


class Engine:
    """Owns the ChatSession and the worker thread that runs the queued jobs."""

    def __init__(self, session: chat.ChatSession, max_queue: int):
        self.session, self.max_queue = session, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.busy = False
        self.counts = collections.Counter(requests=0, completed=0, cancelled=0, errors=0, rejected=0,
                                          completion_tokens=0)
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise APIError(429, f"the server is busy: {len(self.waiting)} requests are waiting already "
                                    f"(--max-queue {self.max_queue}); try again in a moment", code="queue_full")
            self.waiting.append(job)
            self.counts["requests"] += 1
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job from the queue, or stop it before its next token."""
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.waiting:
                    self.cond.wait()
                job = self.waiting.popleft()
                self.busy = True
            try:
                self._run(job)
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():  # the client left while the job was being taken from the queue
            self.counts["cancelled"] += 1
            return
        s = self.session
        if job.seed is None:
            s.rng.seed()  # fresh randomness per request
        else:
            s.rng.manual_seed(job.seed)  # OpenAI's `seed`: the same request gives the same answer
        stream = None
        try:
            stream = job.generate(s)
            for piece in stream:
                if job.cancelled.is_set():
                    break
                job.emit("piece", piece)
        except Exception as e:  # a bug or e.g. CUDA out of memory: fail this request, keep serving
            self.counts["errors"] += 1
            print(f"serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            job.emit("error", e)
            return
        finally:
            if stream is not None:
                stream.close()  # an unfinished answer ends here; the KV cache stays consistent
        reply = s.last
        self.counts["completion_tokens"] += len(reply.ids)
        self.counts["cancelled" if job.cancelled.is_set() else "completed"] += 1
        job.emit("done", reply)


async def job_events(job: Job, idle_seconds: float):
    """The job's events as they come; ("idle", None) after idle_seconds without one."""
    getter = None
    try:
        while True:
            getter = getter or asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter}, timeout=idle_seconds)
            if not done:
                yield "idle", None
                continue
            kind, value = getter.result()
            getter = None
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        if getter is not None:
            getter.cancel()


# -----------------------------------------------------------------------------
# Reading requests: every field checked, every problem a clear 4xx

async def read_json(request: Request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {int(length):,} bytes is larger than this server's limit of {limit:,} bytes",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():  # also bounds bodies sent without Content-Length
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is larger than this server's limit of {limit:,} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_type")
    return data


def number(data: dict, name: str, default, low: float, high: float, integer: bool = False):
    """data[name] (or default when absent or null), checked to be a number in [low, high]."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(422, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}",
                       param=name, code="invalid_type")
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low:g} and {high:g}, got {value:g}", param=name,
                       code="invalid_value")
    return value


def read_sampling(data: dict, defaults: chat.Sampling, limits: Limits) -> tuple[chat.Sampling, int | None]:
    """OpenAI's sampling fields (and vLLM's top_k) over the server's defaults; (sampling, seed)."""
    if data.get("n") not in (None, 1):
        raise APIError(400, "n must be 1: this server gives one answer per request", param="n", code="invalid_value")
    if data.get("stop"):
        raise APIError(400, "stop sequences are not supported; the model stops at the end of its answer",
                       param="stop", code="unsupported_parameter")
    if data.get("logprobs"):
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    if data.get("stream") not in (None, True, False):
        raise APIError(422, "stream must be true or false", param="stream", code="invalid_type")
    name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = data.get(name)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limits.max_tokens:
        raise APIError(400, f"{name} is {max_tokens}, this server's limit is {limits.max_tokens} (--max-tokens)",
                       param=name, code="max_tokens_too_large")
    temperature = number(data, "temperature", defaults.temperature, *TEMPERATURE_RANGE)
    top_p = number(data, "top_p", defaults.top_p, 0.0, 1.0)
    top_k = number(data, "top_k", defaults.top_k, 0, 1_000_000, integer=True)
    if top_p == 0:  # the limit of nucleus sampling as top_p -> 0: only the most likely token
        temperature, top_p = 0.0, None
    sampling = chat.Sampling(temperature=float(temperature), top_k=top_k or None, top_p=top_p,
                             max_new_tokens=number(data, name, limits.max_tokens, 1, limits.max_tokens, integer=True))
    return sampling, number(data, "seed", None, -2**63, 2**64 - 1, integer=True)


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


def check_fits(session: chat.ChatSession, messages: list[dict], sampling: chat.Sampling) -> None:
    """413 when the last user message alone leaves no room for an answer (older turns are dropped silently)."""
    reserve = min(sampling.max_new_tokens, session.context_len // 2)
    try:
        chat.fit_to_context(session.tokenizer, messages, session.context_len - reserve)
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

def usage(reply: chat.Reply) -> dict:
    # A sampled stop token is generated too (OpenAI counts it), though it is not text.
    completion = len(reply.ids) + (reply.finish_reason == "stop")
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": completion,
            "total_tokens": reply.prompt_tokens + completion}


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

    def whole(self, reply: chat.Reply) -> dict:
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
            elif kind == "error":
                yield sse(APIError(500, f"generation failed: {type(value).__name__}: {value}").body())
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
                raise APIError(500, f"generation failed: {type(value).__name__}: {value}", code="generation_failed")
            if kind == "done":
                return JSONResponse(answer.whole(value))
    finally:
        engine.cancel(job)


# -----------------------------------------------------------------------------
# The app

def create_app(session: chat.ChatSession, limits: Limits | None = None, model_name: str = "nanoschnack",
               system: str | None = None) -> FastAPI:
    """The FastAPI app serving `session`. Tests and other programs can mount or run it themselves."""
    limits = limits or Limits()
    engine = Engine(session, limits.max_queue)
    defaults = session.sampling
    app = FastAPI(title="nanoschnack", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    created = int(Path(session.checkpoint).stat().st_mtime) if getattr(session, "checkpoint", None) else 0

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(Exception)
    async def server_error(request, e):  # a bug: logged by uvicorn, answered in OpenAI's shape
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):  # unknown paths and methods, in the same shape
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    async def generate(request: Request, chat_mode: bool):
        if chat_mode and session.kind == "base":
            raise APIError(400, "this is a base model (pretrained only, no chat template): use POST /v1/completions "
                                "to continue text, or fine-tune it with sft.py", code="base_model")
        data = await read_json(request, limits.max_body_bytes)
        sampling, seed = read_sampling(data, defaults, limits)
        if chat_mode:
            messages = read_messages(data, limits, system)
            check_fits(session, messages, sampling)
            work = lambda s: s.stream(messages, sampling)
        else:
            prompt = read_prompt(data, limits)
            work = lambda s: s.complete(prompt, sampling)
        job = Job(asyncio.get_running_loop(), work, seed)
        engine.submit(job)
        answer = Answer(chat_mode, model_name)
        if not data.get("stream"):
            return await whole_answer(engine, job, answer, request)
        options = data.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
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
                "busy": engine.busy, "queued": len(engine.waiting), **engine.counts,
                "limits": {**vars(limits), "temperature": TEMPERATURE_RANGE}}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html; charset=utf-8")

    return app


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve nanoschnack: an OpenAI-compatible API and a German chat page.")
    p.add_argument("--checkpoint", help="checkpoint file or folder (its newest); default: out/chat, else out/base")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only; "
                                                        "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default %(default)s")
    p.add_argument("--model-name", default="nanoschnack", help="the model id in responses (requests may name any)")
    p.add_argument("--system", default=None, help="system message for requests that bring none")
    d = chat.Sampling()
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
    p.add_argument("--log-level", default="info", help="uvicorn's (default %(default)s; 'warning' hides each request)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    limits = Limits(args.max_messages, args.max_message_chars, args.max_total_chars, args.max_tokens, args.max_queue)
    if min(vars(limits).values()) < 1:
        raise SystemExit(f"error: every limit must be at least 1, got {limits}")
    try:
        sampling = chat.Sampling(args.temperature, args.top_k, args.top_p, args.max_tokens)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    session = chat.load_session(args.checkpoint, args.device, sampling)
    app = create_app(session, limits, args.model_name, args.system)
    mode = "chat" if session.kind == "chat" else "base model: completion mode only (/v1/completions)"
    print(f"nanoschnack: {session.checkpoint} (step {session.step}, {mode}), device {session.device}, "
          f"context {session.context_len} tokens; http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
