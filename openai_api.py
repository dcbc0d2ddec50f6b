"""
openai_api.py: OpenAI's API as serve.py speaks it. Reading a request: its body (JSON only, size
and depth bounded, text only), then every field checked, each problem a 4xx in OpenAI's error
shape that names the field and the limit or flag; and writing an answer: the response, chunk
and usage shapes of /v1/chat/completions and /v1/completions.

serve.py is the HTTP side around this (the app, its guard, the engine); nothing here runs the model.
"""
import json
import re
import time
import uuid
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from engine import completion_tokens
from session import ChatSession, Reply, Sampling, fit_to_context
from tok import ConversationError, check_conversation

TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; 0 is greedy
MAX_JSON_DEPTH = 32  # OpenAI's request bodies nest 5 deep; 1,000 would be a RecursionError
MAX_STOP_SEQUENCES = 16  # OpenAI takes 4, vLLM any number; lm-eval sends a task's `until` whole (some have 5 or 6)
MAX_STOP_CHARS = 256  # a stream holds back at most this much text while it may be the start of one
# OpenAI's fields (and vLLM's sampling extensions) that would change the answer, which this server cannot honour,
# and the values that ask for nothing: any other value is refused, so that no client gets something else than it
# asked for untold (the completions endpoint's logprobs=0 asks for the chosen tokens' log-probabilities: refused).
# Fields that change nothing (user, metadata, store, ...) are ignored, as vLLM does.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"),
               "functions": (None, []), "function_call": (None, "none", "auto"),
               "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
               "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0), "min_tokens": (None, 0),
               "ignore_eos": (None, False), "include_stop_str_in_output": (None, False), "stop_token_ids": (None, [])}


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


SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: JSON can escape one alone, UTF-8 has none


def field_name(path: tuple) -> str:
    """A place in the body as a client would write it: messages[0].content (surrogates shown escaped)."""
    name = ""
    for key in path:
        name += f"[{key}]" if isinstance(key, int) else f".{key}" if name else key
    return SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", name)


def too_deep() -> "APIError":
    return APIError(400, f"the request body nests lists and objects deeper than {MAX_JSON_DEPTH} levels",
                    code="invalid_json")


def check_json(data) -> None:
    """400 unless the parsed body nests lists and objects at most MAX_JSON_DEPTH deep and every
    string in it (keys too) is text. JSON may escape half of a surrogate pair alone ("\\ud800");
    Python keeps it in the str, and the first step that encodes it as UTF-8 (the tokenizer, an
    error message that quotes it, the log) would fail: a 500. Iterative: no recursion to exhaust."""
    todo = [(data, 1, ())]
    while todo:
        value, depth, path = todo.pop()
        if isinstance(value, str) and SURROGATE.search(value):
            name = field_name(path) or "the body"
            raise APIError(400, f"{name} is not valid text: it holds a lone UTF-16 surrogate (such as \\ud800 "
                                f"without its pair), which no character is; send text as UTF-8",
                           param=field_name(path[:1]) or None, code="invalid_text")
        if isinstance(value, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and SURROGATE.search(key):
                    todo.append((key, depth, path + (key,)))  # reported as the field whose name it is
                todo.append((item, depth + 1, path + (key,)))


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
    except RecursionError:  # nested deeper than Python's stack
        raise too_deep()
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json")
    check_json(data)
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
    """OpenAI's sampling fields (and vLLM's top_k, where 0 and -1 are off, transformers' no_repeat_ngram_size)
    over the server's defaults; (sampling, seed).

    Temperatures below MIN_TEMPERATURE (and top_p below MIN_TOP_P) are greedy:
    there the most likely token gets all the probability anyway, and float32 cannot divide by them."""
    for name, nothing in UNSUPPORTED.items():
        value = data.get(name)
        if not any(type(value) is type(v) and value == v for v in nothing):  # the type too: 0 is no False
            raise APIError(400, f"{name} is not supported by this server (got {shown(data[name])}); leave it out",
                           param=name, code="unsupported_parameter")
    strict(data, "stream", bool, "true or false")
    if data.get("stream_options") is not None and not isinstance(data["stream_options"], dict):
        raise APIError(422, "stream_options must be an object", param="stream_options", code="invalid_type")
    if data.get("stream_options") is not None and not data.get("stream"):  # as OpenAI and vLLM answer it
        raise APIError(400, "stream_options applies to streamed answers only: send it with stream: true",
                       param="stream_options", code="invalid_value")
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
    top_k = number(data, "top_k", defaults.top_k, -1, 1_000_000, integer=True)
    sampling = Sampling(temperature=float(temperature), top_k=top_k if top_k and top_k > 0 else None, top_p=top_p,
                        max_new_tokens=number(data, name, limits.max_tokens, 1, limits.max_tokens, integer=True),
                        frequency_penalty=float(number(data, "frequency_penalty", defaults.frequency_penalty, -2.0, 2.0)),
                        presence_penalty=float(number(data, "presence_penalty", defaults.presence_penalty, -2.0, 2.0)),
                        no_repeat_ngram_size=number(data, "no_repeat_ngram_size", defaults.no_repeat_ngram_size, 0,
                                                    limits.max_tokens, integer=True),
                        stop=read_stop(data))
    return sampling, number(data, "seed", None, -2**63, 2**64 - 1, integer=True)


def read_n(data: dict, limits: Limits, prompts: int = 1) -> int:
    """OpenAI's n: how many answers to each prompt. At most --max-batch answers in all: they are generated side
    by side."""
    n = number(data, "n", 1, 1, 128, integer=True)
    if n * prompts > limits.max_batch:
        asked = f"n is {n}" if prompts == 1 else f"{prompts} prompts with n = {n} ask for {n * prompts} answers"
        raise APIError(400, f"{asked}, more than this server generates at once (--max-batch {limits.max_batch})",
                       param="n", code="invalid_value")
    return n


def read_stop(data: dict) -> tuple[str, ...]:
    """OpenAI's stop: null, a string, or a list of up to MAX_STOP_SEQUENCES strings, each of 1 to MAX_STOP_CHARS
    characters (session.StopSequences ends the answer before the first to appear)."""
    stop = data.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(422, f"stop must be a string or a list of strings, got {shown(stop)}", param="stop",
                       code="invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop holds {len(stops)} sequences, at most {MAX_STOP_SEQUENCES} are allowed",
                       param="stop", code="invalid_value")
    if not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters", param="stop",
                       code="invalid_value")
    return tuple(dict.fromkeys(stops))


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
    """The conversation, within the limits and the chat template's rules (system?, user, assistant, ..., user).

    An earlier answer may be empty or whitespace only (tok.check_conversation says how it renders): this
    server's own answer is "" when a stop sequence matches at once, and a client sends it back. A blank user
    or system message stays a 400: no answer of the server makes one, so a client sees its own mistake at once,
    and the model was never shown a question of nothing (the page and chat.py send none either)."""
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
    """The kept messages and the prompt's ids, as ChatSession.stream makes them; a 400 (as OpenAI's) when the
    last user message alone leaves no room for an answer (older exchanges are dropped: serve.py's
    X-Dropped-Messages header counts them)."""
    reserve = min(sampling.max_new_tokens, session.context_len // 2)
    try:
        return fit_to_context(session.tokenizer, messages, session.context_len - reserve)
    except ConversationError as e:
        raise too_long(e, session, "messages")


def check_prompt_fits(session: ChatSession, prompt: str, sampling: Sampling) -> list[int]:
    """A completion prompt's ids, as ChatSession.complete makes them; a 400 when it does not fit."""
    try:
        return session.completion_prompt(prompt, sampling)
    except ConversationError as e:
        raise too_long(e, session, "prompt")


def too_long(e: ConversationError, session: ChatSession, param: str) -> APIError:
    return APIError(400, f"{e} (context {session.context_len} tokens); shorten it, or ask for fewer max_tokens",
                    param=param, code="context_length_exceeded")


def read_prompts(data: dict, limits: Limits) -> list[str]:
    """OpenAI's prompt: a string, or a list of them (a batch, answered side by side; read_n bounds it)."""
    prompt = data.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise APIError(422, "prompt must be a non-empty string or a list of them (token ids are not supported)",
                       param="prompt", code="invalid_type")
    chars = sum(len(p) for p in prompts)
    if chars > limits.max_total_chars:
        raise APIError(413, f"prompt has {chars:,} characters, at most {limits.max_total_chars:,} are allowed "
                            f"(--max-total-chars)", param="prompt", code="prompt_too_long")
    return prompts


# -----------------------------------------------------------------------------
# Writing answers in OpenAI's shapes

def usage(replies: list[Reply], n: int = 1) -> dict:
    """One request's usage: the n answers to a prompt (replies[k*n:(k+1)*n]) count it once, as OpenAI does, and
    all answers add their tokens."""
    completion = sum(completion_tokens(reply) for reply in replies)
    prompt, cached = (sum(getattr(reply, name) for reply in replies[::n]) for name in ("prompt_tokens", "cached_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # as OpenAI reports prompt caching



def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Answer:
    """The fixed fields of one response and how its chunks look, for both endpoints."""

    def __init__(self, chat_mode: bool, model: str, n: int = 1):
        self.chat_mode, self.model, self.n = chat_mode, model, n  # n answers to each prompt
        self.id = ("chatcmpl-" if chat_mode else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, replies: list[Reply]) -> dict:
        if self.chat_mode:
            choices = [{"index": i, "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish_reason} for i, reply in enumerate(replies)]
        else:
            choices = [{"index": i, "text": reply.text, "logprobs": None, "finish_reason": reply.finish_reason}
                       for i, reply in enumerate(replies)]
        return {**self.head("chat.completion" if self.chat_mode else "text_completion"),
                "choices": choices, "usage": usage(replies, self.n)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False,
              index: int = 0) -> dict:
        """A streamed piece of answer `index` (0 to n-1)."""
        if self.chat_mode:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self.head("chat.completion.chunk" if self.chat_mode else "text_completion"), "choices": [choice]}
