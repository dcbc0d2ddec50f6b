"""
session.py: the model in conversation, without a terminal or a server: what chat.py,
serve.py's engines, sft.py and the benchmarks share.

- ChatSession: model, tokenizer, KV cache, history and sampling settings.
  `send(text)` answers the next user message of its own history, `stream(messages)`
  answers a whole OpenAI-style message list, `complete(text)` continues plain
  text (base models). All three return generators of text pieces; the caller stops
  an answer early by closing the generator (or just leaving the loop).
- load_session(): a ChatSession on a checkpoint, with clear errors.
- Sampling, Reply, StopSequences: how an answer is sampled, what it did, and OpenAI's stop
  sequences (ChatSession and both of serve.py's engines end answers with them alike).
- prefill(), decode(): many sequences decoded together on one kvcache.KVCache, each at its own
  position (serve.py's continuous batching, engine.BatchEngine).

How the KV cache is kept across turns. The session keeps `cached_ids`, exactly
the tokens whose keys and values the cache holds. The history (text) is the
truth; the cache is only an optimisation of it. For every answer the whole
conversation is rendered with tok.render_prompt, the cache is truncated to the
longest common prefix of `cached_ids` and the new prompt, and only the rest is
prefilled, in one forward. Usually that is just the new user message: the decode
loop (GPT.generate, shared with training samples, sft.py and serve.py) feeds every
token it yields, so the cache already holds the previous answer's
<|assistant_end|>. The same rule covers
every other case without special code: an answer stopped by the token limit or
Ctrl-C (history keeps the text shown so far; the rendering closes it with
<|assistant_end|>), an answer whose tokens differ from how the tokenizer encodes
its text, a changed system message, /reset, and trimming, which changes the
prompt right after the system message, so everything after it is rebuilt.

Context: prompt + answer never go past the model's training length
(config.sequence_len). The rotary tables reach further, but the model has never
seen those positions. Before each answer the oldest whole user+assistant
exchanges are dropped (the system message stays) until the prompt leaves room
for max_new_tokens (at most half the context); the answer may then use all the
room left.

Continuous batching decodes many sequences at once on one model, on the same kvcache.KVCache:
its rows each sit at their own position. A server's sequences arrive at different times
with prompts of different lengths; a row is a slot: a request takes a free one, fills it,
and leaves it when it ends (its tokens stay, for reuse by the same client).

- decode(): one new token for each of rows 0..n-1 in one step (GPT.decode): each row's key
  lands at its own length, its query sees its own keys only. A compiled cache's step takes a
  fixed number of rows: n is rounded up to the next batch size it was compiled for, and the
  rows past n are fed a dummy token and not kept.
- prefill(): the prompts of newcomers, each after its own cached prefix, in one forward
  over their rows, right-padded to the longest (a padding token's key lands after its
  row's length, where no query of that row looks, and the next tokens overwrite it).

The decode step is compiled once at load on CUDA (gpt.compile_decode, NANOSCHNACK_COMPILE_DECODE),
and the prefill warmed up (warm_up_prefill: its attention kernel compiles at first use too):
load_session does it for the session's cache, engine.BatchEngine for its own.
"""
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

import common
import gpt
from gpt import autocast
from tok import ConversationError, check_conversation, render_prompt

DEFAULT_CHECKPOINTS = ("out/chat", "out/base")  # sft.py writes the first, train.py the second
# Below these, sampling is greedy. The logits are soft-capped at +-15, so at temperature 1e-6
# a token 1e-4 below the best one is e^-100 as likely already; and logits / temperature
# overflows float32 below about 1e-37 (top_p below float32's range rounds to 0, dropping every token).
MIN_TEMPERATURE = 1e-6
MIN_TOP_P = 1e-6
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class Sampling:
    """How answers are sampled. Refuses what cannot be sampled (negative or non-finite values);
    a temperature below MIN_TEMPERATURE or a top_p below MIN_TOP_P samples greedily (`greedy`). The fields
    keep what was asked for, so that settings made from these (chat.py's /temp, a request that names only
    its temperature) keep the rest: `--temperature 0 --top-p 0.9`, then `/temp 0.8`, samples with top_p 0.9."""
    temperature: float = 0.6  # 0 = greedy
    top_k: int | None = 50  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    max_new_tokens: int = 512  # per answer; the context may leave less
    frequency_penalty: float = 0.0  # OpenAI's, -2 to 2 (gpt.penalize): per time a token was already generated
    presence_penalty: float = 0.0  # OpenAI's, -2 to 2: once for every token already generated
    no_repeat_ngram_size: int = 0  # transformers': n > 0 forbids repeating any n tokens of the answer (0 = off)
    stop: tuple[str, ...] = ()  # OpenAI's stop sequences: the answer ends before the first to appear (StopSequences)

    def __post_init__(self):
        gpt.check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (math.isfinite(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise ValueError(f"{name} must be a number from -2 to 2 (0 = off), got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        """Only the most likely token: the limit of sampling as the temperature or top_p goes to 0."""
        return self.temperature < MIN_TEMPERATURE or (self.top_p is not None and self.top_p < MIN_TOP_P)

    def sampler(self) -> tuple[float, int | None, float | None]:
        """temperature, top_k, top_p as gpt.sample_next_token and GPT.generate take them (greedy: temperature 0)."""
        return (0.0, None, None) if self.greedy else (self.temperature, self.top_k or None, self.top_p)


@dataclass
class Reply:
    """What one answer did; `ChatSession.last` is updated while it streams."""
    text: str = ""  # the text pieces yielded so far, joined
    ids: list[int] = field(default_factory=list)  # the answer's token ids, without the stop token (or up to the
                                                  # one that completed its stop sequence)
    finish_reason: str | None = None  # "stop" (a special token or a stop sequence), "length" (token limit),
                                      # "interrupted"; None while streaming
    stop_sequence: str | None = None  # the stop sequence that ended the answer (its text is not in `text`)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the KV cache instead of computed
    dropped_messages: int = 0  # oldest messages left out to fit the context
    ttft: float | None = None  # seconds from the call to the first sampled token


class StopSequences:
    """OpenAI's `stop`: an answer ends where one of these strings first appears in its text, and
    shows none of it. Text that could still become one is held back until it cannot (as vLLM
    does), so a stream never shows the start of a stop sequence that it would then take back.
    push() each piece of text as it is decoded; end() when the answer ends otherwise."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.found = stops, "", None

    def push(self, piece: str) -> str:
        """What of the text so far can be shown now; `found` is set once a stop sequence has appeared."""
        text = self.held + piece
        hits = [(text.find(stop), stop) for stop in self.stops if stop in text]
        if hits:
            at, self.found = min(hits)
            self.held = ""
            return text[:at]
        hold = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.held = text[len(text) - hold:]
        return text[:len(text) - hold]

    def flush(self) -> str:
        """The text held back: at an answer's end by its stop token or its limit, no stop sequence completes it."""
        held, self.held = self.held, ""
        return held

    def end(self, decoder) -> str:
        """What is left to show when the answer ends by its stop token or its limit: the held text, and the
        bytes of an unfinished character in the stream decoder (shown as U+FFFD); nothing after a stop sequence."""
        return "" if self.found else self.flush() + decoder.flush()


class PromptTooLong(ConversationError):
    """The last message (a completion's text) alone leaves the answer no room; `tokens` and `room` for callers
    that say so in their own words (chat.py's German notes); the message is the API's."""

    def __init__(self, what: str, tokens: int, room: int):
        super().__init__(f"the {what} is too long: its prompt has {tokens} tokens, the context has room for {room} "
                         f"(plus the answer)")
        self.tokens, self.room = tokens, room


class SystemTooLong(ConversationError):
    """check_system's refusal; the numbers for chat.py's German note, the message for --system's error
    (chat.py and serve.py)."""

    def __init__(self, tokens: int, allowed: int):
        super().__init__(f"the system message is too long: {tokens:,} tokens with a one-word question, at most "
                         f"{allowed} (half the room for prompts) are allowed")
        self.tokens, self.allowed = tokens, allowed


def check_system(session: "ChatSession", text: str | None) -> None:
    """SystemTooLong unless the system message leaves at least half of the prompt's room
    to the conversation: else every later message would be refused as too long."""
    if not text:
        return
    room = session.context_len - min(session.sampling.max_new_tokens, session.context_len // 2)
    ids = render_prompt(session.tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": "."}])
    if len(ids) > room // 2:
        raise SystemTooLong(len(ids), room // 2)


def fit_to_context(tokenizer, messages, max_prompt_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest user+assistant exchanges (a system message stays) until the prompt fits.

    Returns the kept messages and their prompt ids (render_prompt). ConversationError
    if the messages break the template's rules or the last user message alone is too long.
    """
    messages = check_conversation(messages, ends_with="user")
    first = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids = render_prompt(tokenizer, messages)
        if len(ids) <= max_prompt_tokens:
            return messages, ids
        if len(messages) - first < 3:  # only the last user message is left (with the system message)
            raise PromptTooLong("last message with the system message" if first else "message", len(ids),
                                max_prompt_tokens)
        messages = messages[:first] + messages[first + 2:]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A model in conversation: one KV cache, one history, sampling settings; no terminal.

    One session serves one answer at a time (it owns one cache); sessions can
    share a model. kind "chat" uses the chat template, kind "base" (a model that
    was only pretrained) continues plain text with complete().
    """

    def __init__(self, model, tokenizer, kind: str = "chat", sampling: Sampling | None = None,
                 system: str | None = None, seed: int | None = None):
        if kind not in ("chat", "base"):
            raise ValueError(f"kind must be 'chat' or 'base', got {kind!r}")
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.sampling = sampling or Sampling()
        self.system = system  # the system message, or None
        self.history: list[dict] = []  # complete user/assistant exchanges, oldest first
        self.device = model.lm_head.weight.device
        self.context_len = model.config.sequence_len
        # one more than the context: generate() feeds each token it yields, the last one too
        self.cache = model.new_kv_cache(1, max_len=self.context_len + 1)
        self.cached_ids: list[int] = []  # exactly the tokens the cache holds
        # a model of shapes only (the meta device: serve.py's HTTP side, load_session) never samples
        self.rng = torch.Generator(device="cpu" if self.device.type == "meta" else self.device)
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)
        self.last = Reply()
        # Any special token ends an answer: the template never puts one inside an
        # assistant's text (normally it is <|assistant_end|>). Base models stop at <|bos|>.
        self.chat_stop_ids = set(tokenizer.special.values())
        self.base_stop_ids = {tokenizer.bos_id}

    # -- conversation -----------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        """The system message (if any) and the history, as {role, content} dicts."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        """Start a new conversation; the system message stays (and so does the cached prefix of it)."""
        self.history = []

    def clear_cache(self) -> None:
        """Forget what the KV cache holds: the next answer computes its whole prompt (serve.py
        calls it between requests of different clients, so none can time another's prompt)."""
        self.cache.truncate(0)
        self.cached_ids.clear()

    def send(self, text: str, sampling: Sampling | None = None) -> Iterator[str]:
        """Answer the next user message: stream text pieces, then add the exchange to the history.

        A stopped answer keeps the text shown so far. An answer with no text is
        not kept, and neither is its question. Oldest exchanges that do not fit the
        context are dropped from the history. Base models: complete(text).
        """
        if self.kind == "base":
            return self.complete(text, sampling)
        user = {"role": "user", "content": text}
        stream = self.stream(self.messages + [user], sampling)  # raises ConversationError now, not later
        return self._remember(stream, user)

    def _remember(self, stream, user):
        try:
            yield from stream
        finally:  # also when the caller stops early or Ctrl-C interrupts a forward
            self.history = self.history[self.last.dropped_messages:]
            if self.last.text.strip():
                self.history += [user, {"role": "assistant", "content": self.last.text}]

    # -- generation -------------------------------------------------------------

    def stream(self, messages: list[dict], sampling: Sampling | None = None) -> Iterator[str]:
        """Stream the assistant's answer to OpenAI-style messages (system?, user, assistant, ..., user).

        Does not touch the session's history; reuses the KV cache as far as the
        rendered prompt agrees with it. Messages that do not fit the context are
        dropped oldest first (see last.dropped_messages). Raises ConversationError
        right away for messages that break the template's rules.
        """
        sampling = sampling or self.sampling
        checked = check_conversation(messages, ends_with="user")
        reserve = min(sampling.max_new_tokens, self.context_len // 2)
        kept, prompt = fit_to_context(self.tokenizer, checked, self.context_len - reserve)
        return self._generate(prompt, sampling, self.chat_stop_ids, dropped=len(checked) - len(kept))

    def answer(self, messages: list[dict], sampling: Sampling | None = None) -> Reply:
        """stream() to the end, for callers that want the whole answer at once."""
        for _ in self.stream(messages, sampling):
            pass
        return self.last

    def complete(self, text: str, sampling: Sampling | None = None) -> Iterator[str]:
        """Continue plain text: the prompt is <|bos|> + text; stops at <|bos|> or the token limit."""
        sampling = sampling or self.sampling
        return self._generate(self.completion_prompt(text, sampling), sampling, self.base_stop_ids)

    def completion_prompt(self, text: str, sampling: Sampling) -> list[int]:
        """complete()'s prompt ids; ConversationError (now, not when streaming) when they leave the answer less
        than its share of the context, min(max_tokens, half of it), as for a chat's last message: a text's
        beginning is never cut off silently."""
        room = self.context_len - min(sampling.max_new_tokens, self.context_len // 2)
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
        if len(ids) > room:
            raise PromptTooLong("text", len(ids), room)
        return ids

    def _generate(self, prompt: list[int], sampling: Sampling, stop_ids: set[int], dropped: int = 0):
        reply = self.last = Reply(prompt_tokens=len(prompt), dropped_messages=dropped)
        start = time.perf_counter()
        budget = min(sampling.max_new_tokens, self.context_len - len(prompt))
        decoder = self.tokenizer.stream_decoder()  # holds back half a UTF-8 character
        stop = StopSequences(sampling.stop)  # holds back what may begin a stop sequence
        # Reuse the cache as far as it agrees with the prompt, but feed at least one
        # token: its logits give the first answer token.
        reply.cached_tokens = min(common_prefix_len(self.cached_ids, prompt), len(prompt) - 1)
        self.cache.truncate(reply.cached_tokens)
        received = []  # every token generate() gave us, the stop token included
        tokens = self.model.generate(prompt[reply.cached_tokens:], budget, *sampling.sampler(),
                                     kv_cache=self.cache, generator=self.rng,
                                     frequency_penalty=sampling.frequency_penalty,
                                     presence_penalty=sampling.presence_penalty,
                                     no_repeat_ngram_size=sampling.no_repeat_ngram_size)
        try:
            for token in tokens:
                received.append(token)
                if reply.ttft is None:
                    reply.ttft = time.perf_counter() - start
                if token in stop_ids:
                    reply.finish_reason = "stop"
                    break
                reply.ids.append(token)
                piece = stop.push(decoder.push(token))
                if piece:
                    reply.text += piece
                    yield piece
                if stop.found:
                    reply.finish_reason, reply.stop_sequence = "stop", stop.found
                    break
            else:
                reply.finish_reason = "length"
            tail = stop.end(decoder)
            if tail:
                reply.text += tail
                yield tail
        finally:
            tokens.close()
            # The cache only advances when a forward completes, so after a Ctrl-C in
            # the middle of one it still holds a prefix of what we sent and received.
            self.cached_ids = (prompt + received)[:self.cache.pos]
            if reply.finish_reason is None:  # closed early, or an exception (Ctrl-C) went through
                reply.finish_reason = "interrupted"


# -----------------------------------------------------------------------------
# Loading

def find_checkpoint(path: str | None) -> Path:
    """The path given (a file or a folder), else the first of out/chat, out/base that holds a checkpoint."""
    if path:
        return Path(path)
    for folder in DEFAULT_CHECKPOINTS:
        if common.latest_checkpoint(Path(folder)):
            return Path(folder)
    raise SystemExit(f"error: no checkpoint in {' or '.join(DEFAULT_CHECKPOINTS)}; fine-tune one with sft.py, "
                     f"pretrain one with train.py, or pass --checkpoint FILE_OR_FOLDER")


def load_session(checkpoint: str | None = None, device: str | None = None, sampling: Sampling | None = None,
                 system: str | None = None, seed: int | None = None, compile_decode: bool | None = None) -> ChatSession:
    """A ChatSession on a checkpoint file or a folder's newest one (None: out/chat, else out/base).

    The model keeps its matrices in the compute dtype (gpt.serving_weights: bf16 on CUDA), and
    the session's decode step is compiled and warmed up now and its prefill warmed up (warm_up_prefill),
    where compile_decode says so (None: gpt.compile_wanted, i.e. on CUDA unless
    NANOSCHNACK_COMPILE_DECODE=0), so that the first answer pays for none of it.

    The session also gets `checkpoint` (the file), `step`, and `ckpt` (the dict,
    without weights). A missing or incompatible checkpoint raises SystemExit
    with an "error: ..." message. On device "meta" the model has the checkpoint's
    shapes and no weights (none are read): a session that tokenizes and checks
    prompts but never generates, as serve.py's HTTP side.
    """
    device = device or common.default_device()
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"error: unknown device {device!r} ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: device {device} asked for, but CUDA is not available here (use --device cpu)")
    path = find_checkpoint(checkpoint)
    model, tokenizer, ckpt = common.load_model(path, device, reader="this chat.py")
    gpt.serving_weights(model)
    kind = ckpt.get("kind", "base")
    if kind not in ("base", "chat"):
        raise SystemExit(f"error: {ckpt['path']} has kind {kind!r}; chat.py runs 'chat' (sft.py) or 'base' (train.py)")
    session = ChatSession(model, tokenizer, kind=kind, sampling=sampling, system=system, seed=seed)
    if gpt.compile_wanted(device) if compile_decode is None else compile_decode:
        gpt.compile_decode(model, session.cache.allocate(gpt.cache_dtype(model)))
        warm_up_prefill(model, session.cache)
    session.checkpoint, session.step = ckpt["path"], ckpt.get("step")
    session.ckpt = {k: v for k, v in ckpt.items() if k not in ("model", "optimizers")}
    return session



# -----------------------------------------------------------------------------
# Many sequences, each at its own position, on one model and one cache

def batch_sizes(max_batch: int) -> list[int]:
    """The row counts a compiled batch step is made for: powers of two up to max_batch, and max_batch. A step
    of n rows pads to the next one: at most twice the rows (the weights, read once per step whatever the
    rows, cost the same), one CUDA graph per size, and a handful of compiles at load."""
    return sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})


def batch_cache(model, rows: int, max_len: int) -> gpt.KVCache:
    """A KV cache of `rows` sequences of up to max_len tokens, allocated now; its decode step compiled
    (for batch_sizes(rows)) and its prefill warmed up (warm_up_prefill) where gpt.compile_wanted says so."""
    # allocated here, outside inference mode: the engine swaps its rows in place between steps
    cache = model.new_kv_cache(rows, max_len).allocate(gpt.cache_dtype(model))
    if gpt.compile_wanted(cache.device):
        gpt.compile_decode(model, cache, batch_sizes(rows))
        warm_up_prefill(model, cache)
    return cache


# Inference mode, not no_grad, as GPT.generate and compile_decode: no version counters or autograd metadata
# on the many small tensors of a step; a batched CPU step of 8 rows took 1.08-1.11x as long under no_grad
# (bench/ab.py, paired rounds).
@torch.inference_mode()
def prefill(model, cache: gpt.KVCache, start: int, keeps: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Rows start, start+1, ...: keep row i's first keeps[i] tokens and compute prompts[i] after
    them, all in one forward; the logits (len(prompts), vocab) after each prompt's last token."""
    T = max(len(p) for p in prompts)
    for i, keep in enumerate(keeps):
        cache.set_length(start + i, keep)
    x = torch.tensor([p + p[-1:] * (T - len(p)) for p in prompts], dtype=torch.long, device=cache.device)
    with autocast(x.device):
        logits = model(x, kv_cache=cache.rows(start))
    for i, (keep, p) in enumerate(zip(keeps, prompts)):
        cache.set_length(start + i, keep + len(p))  # the padding is not kept
    return logits[range(len(prompts)), [len(p) - 1 for p in prompts]].float()


@torch.inference_mode()
def decode(model, cache: gpt.KVCache, tokens: list[int]) -> torch.Tensor:
    """Feed tokens[i] to row i, all in one step; the next logits (len(tokens), vocab)."""
    n = len(tokens)
    B = next(b for b in cache.batch_sizes if b >= n) if cache.compiled else n
    x = torch.tensor(tokens + [0] * (B - n), dtype=torch.long, device=cache.device)[:, None]
    with autocast(x.device):
        return model.decode(x, cache, keep=n)[:n]


# Triton specialises an int argument on whether it divides by 16, so prompts whose length does and prompts
# whose length does not are two compiles of the prefill's attention kernel: one prompt of each at load.
# tests/test_kernels_compile.py binds the launch of every prompt length from 2 to 299 tokens as Triton's
# JIT would: these two lengths cover every compile key they need.
WARM_UP_PROMPT_LENGTHS = (16, 17)


def warm_up_prefill(model, cache: gpt.KVCache) -> float:
    """Run the prefill on row 0 once for each kind of prompt it meets, then forget it, so that the first
    request does not compile it. On CUDA the attention of a prompt into an empty row is our Triton kernel, which
    compiles at its first launch of each specialisation (seconds a compile: issue 26 measured a first token
    of 4.9 s with everything compiling at first use); a prompt after cached tokens (a later turn, a shared
    prefix) takes SDPA with a mask. Returns the seconds it took; says so on stderr, as compile_decode does."""
    log = lambda text: print(text, file=sys.stderr, flush=True)
    log(f"warming up the prefill (prompts of {' and '.join(map(str, WARM_UP_PROMPT_LENGTHS))} tokens, "
        "and one after cached tokens) ...")
    started = time.perf_counter()
    longest = max(WARM_UP_PROMPT_LENGTHS)
    runs = [(0, n) for n in WARM_UP_PROMPT_LENGTHS] + [(longest, min(WARM_UP_PROMPT_LENGTHS))]  # (cached, new)
    for cached, new in runs:
        if cached + new <= cache.max_len:
            prefill(model, cache, 0, [cached], [[0] * new])  # after the longest, row 0 holds `longest` tokens
    cache.set_length(0, 0)
    if cache.device.type == "cuda":
        torch.cuda.synchronize(cache.device)
    seconds = cache.prefill_warm_up_seconds = time.perf_counter() - started
    log(f"warming up the prefill ... done in {seconds:.1f} s")
    return seconds
