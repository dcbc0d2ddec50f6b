"""
engine.py: the model side of serve.py. A queue of generation jobs in front of one model,
and a worker thread that runs them: one at a time (Engine) or continuously batched
(BatchEngine, on a kvcache.KVCache of many rows), in serve.py's process or in one of its own (EngineProcess).
serve.py is the HTTP side: it parses and checks requests, submits Jobs and turns their
events into OpenAI's responses.

How requests share the model. A model and its KV cache serve one generation at a time
per row, so one worker thread owns them and takes jobs from a FIFO queue; the event loop
only parses requests and forwards text pieces. Each job gets its own asyncio queue, which
the worker fills through `loop.call_soon_threadsafe`: pieces of two answers can never mix,
and a slow generation never blocks other requests from being answered. A job whose client
goes away is marked cancelled: the worker stops it before the next token (or skips it
while it still waits) and moves on.

Continuous batching decodes many sequences at once on one model, each at its own position,
on a kvcache.KVCache whose rows each have their own position (session.py's docstring says how). BatchEngine admits newcomers into free rows,
prefills their prompts together, and decodes all running rows in one forward per step.

In its own process: engine_process.py (EngineProcess, serve.py's default).

Exactness: on CPU in fp32, prefill() and decode() give a row the logits of the single-sequence path
up to float rounding (below 1e-5 on the test models: a matmul of B rows, or SDPA over
masked keys, sums in another order), whatever the other rows are. So greedy answers are
the same tokens as alone unless the two best logits of some step lie within that
rounding of each other; tests/test_engine.py, tests/test_serve.py and tests/test_serve_live.py check token equality.
On CUDA with bf16 autocast the rounding is bf16's, and near-ties flip more easily.
"""
import asyncio
import collections
import math
import sys
import threading
import time

import torch

import gpt
from session import (ChatSession, Reply, Sampling, StopSequences, batch_cache, common_prefix_len, decode,
                     load_session, prefill)


def log(text: str) -> None:
    """One line on stderr: what went wrong, never a traceback, for things clients cause."""
    print(f"serve: {text}", file=sys.stderr, flush=True)


class QueueFull(Exception):
    """More jobs are waiting than max_queue: serve.py answers 429."""


# -----------------------------------------------------------------------------
# Jobs, the queue, and the two engines

class RequestTimeout(Exception):
    """A request outlived --request-timeout (waiting and generating together)."""


def completion_tokens(reply: Reply) -> int:
    """The one rule for counting generated tokens, in usage and in /health: every sampled
    token, including the stop token that ends an answer (OpenAI counts it too), though it is no text.
    An answer ended by a stop sequence has no stop token: its ids hold every token it sampled."""
    return len(reply.ids) + (reply.finish_reason == "stop" and reply.stop_sequence is None)


FINAL = ("done", "error", "cancelled")  # a job's last event: it has no more after one of these


class Job:
    """One request's generation. The worker reports through `emit`: ("piece", text)..., then
    ("done", Reply) or ("error", exception), or ("cancelled", None) when it is dropped
    before it starts; by default into `events`, an asyncio queue of the event loop that made the job.

    What to generate is plain data (SPEC), so a job can be sent to the engine process:
    prompt (token ids, what the batched engine feeds), sampling, seed, and for the one-at-a-time
    engine's ChatSession either `messages` (chat) or `text` (completion). cache_key: whose KV
    cache this request may reuse (None: nobody's). deadline: time.monotonic() after which the
    worker drops the job with RequestTimeout."""

    SPEC = ("prompt", "sampling", "seed", "cache_key", "deadline", "stop_ids", "dropped", "messages", "text", "submitted")

    def __init__(self, prompt: list[int], sampling: Sampling, seed: int | None = None, cache_key=None,
                 deadline: float = math.inf, stop_ids=(), dropped: int = 0, messages: list[dict] | None = None,
                 text: str | None = None, submitted: float | None = None, deliver=None):
        self.prompt, self.sampling, self.seed, self.cache_key, self.deadline = prompt, sampling, seed, cache_key, deadline
        self.stop_ids, self.dropped, self.messages, self.text = stop_ids, dropped, messages, text
        self.reply: Reply | None = None  # the answer so far, once the job runs
        self.submitted = time.monotonic() if submitted is None else submitted  # for the metrics (a clock all
        self.first_piece = None                                                # processes of this machine share)
        if deliver is None:
            loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
            deliver = lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event)
        self.deliver = deliver
        self.cancelled = threading.Event()
        self.id = None  # EngineProcess's name for it
        self.on_finish = None  # called in the worker as on_finish(completion tokens) when it has generated

    def spec(self) -> dict:
        return {name: getattr(self, name) for name in self.SPEC}

    def generate(self, session: ChatSession):
        """The one-at-a-time engine's generation: an iterator of text pieces."""
        if self.messages is not None:
            return session.stream(self.messages, self.sampling)
        return session.complete(self.text, self.sampling)

    def emit(self, kind: str, value=None) -> None:
        try:
            self.deliver((kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, bounds: tuple):
        self.bounds, self.buckets, self.sum, self.count = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.buckets[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {n}' for b, n in zip(self.bounds, self.buckets)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What GET /metrics reports besides the engine's counters (serve.py counts the HTTP statuses)."""

    def __init__(self):
        self.ttft = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))  # seconds, from arrival
        self.rate = Histogram((1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500))  # tokens/s of one answer

    def finished(self, job: Job, reply: Reply) -> None:
        if job.first_piece is None:
            return
        self.ttft.observe(job.first_piece - job.submitted)
        seconds = time.monotonic() - job.first_piece
        if len(reply.ids) > 1 and seconds > 0:
            self.rate.observe((len(reply.ids) - 1) / seconds)


class Queue:
    """The waiting line in front of a model, and the counters; shared by both engines."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.counts = collections.Counter(requests=0, completed=0, cancelled=0, errors=0, rejected=0, timeouts=0,
                                          completion_tokens=0)
        self.on_piece = None  # tests: called in the worker as on_piece(job) before each piece is sent
        self.metrics = Metrics()

    @property
    def slots(self) -> int:
        """Answers generated at once."""
        return 1

    @property
    def running(self) -> int:
        return int(self.busy)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        with self.cond:
            # A job waits only until the worker takes it (one per step): jobs that a free slot
            # will take don't count against max_queue, else a burst gets 429s while slots are free.
            if len(self.waiting) >= self.max_queue + max(0, self.slots - self.running):
                self.counts["rejected"] += 1
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting already "
                                f"(--max-queue {self.max_queue}); try again in a moment")
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
                job.emit("cancelled")

    def gone(self, job: Job) -> bool:
        """Whether a job taken from the queue is over before it starts: its client left, or its time ran out
        while it waited (counted, and the client told)."""
        if job.cancelled.is_set():
            self.counts["cancelled"] += 1
            job.emit("cancelled")
            return True
        if time.monotonic() > job.deadline:
            self.counts["timeouts"] += 1
            job.emit("error", RequestTimeout("the request waited longer than --request-timeout"))
            return True
        return False

    def finish(self, job: Job, reply: Reply, timed_out: bool = False) -> None:
        """Count a job that generated (completely or not) and tell its client."""
        self.counts["completion_tokens"] += completion_tokens(reply)
        if job.on_finish is not None:
            job.on_finish(completion_tokens(reply))
        self.metrics.finished(job, reply)
        if timed_out:
            self.counts["timeouts"] += 1
            job.emit("error", RequestTimeout("the answer took longer than --request-timeout"))
            return
        self.counts["cancelled" if job.cancelled.is_set() else "completed"] += 1
        job.emit("done", reply)


class Engine(Queue):
    """One generation at a time (--max-batch 1): a worker thread runs the queued jobs on one
    ChatSession, in FIFO order. Simple, and the reference the batched engine is measured against."""

    def __init__(self, session: ChatSession, max_queue: int):
        super().__init__(max_queue)
        self.session = session
        self.busy = False
        self.cache_owner = None  # the cache_key of the request whose tokens the session's KV cache holds
        threading.Thread(target=self._work, name="generation", daemon=True).start()

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
        if self.gone(job):
            return
        s = self.session
        if job.cache_key is None or job.cache_key != self.cache_owner:
            # Another client's tokens must not make this prompt faster: that would let it
            # time guesses of their prompt. Reuse stays within one cache_key.
            s.clear_cache()
        self.cache_owner = job.cache_key
        if job.seed is None:
            s.rng.seed()  # fresh randomness per request
        else:
            s.rng.manual_seed(job.seed)  # OpenAI's `seed`: the same request gives the same answer
        stream = None
        timed_out = False
        try:
            stream = job.generate(s)
            for piece in stream:
                job.reply = s.last
                job.first_piece = job.first_piece or time.monotonic()
                if self.on_piece is not None:
                    self.on_piece(job)
                if job.cancelled.is_set():
                    break
                if time.monotonic() > job.deadline:
                    timed_out = True
                    break
                job.emit("piece", piece)
        except Exception as e:  # a bug or e.g. CUDA out of memory: fail this request, keep serving
            self.counts["errors"] += 1
            log(f"generation failed: {type(e).__name__}: {e}")
            job.emit("error", e)
            return
        finally:
            if stream is not None:
                stream.close()  # an unfinished answer ends here; the KV cache stays consistent
        job.reply = s.last  # also an answer that ended before its first piece of text
        self.finish(job, s.last, timed_out)



class Row:
    """One slot of the batch: the job it serves (None: free) and the tokens its KV cache row holds."""

    def __init__(self):
        self.job: Job | None = None
        self.ids: list[int] = []  # exactly the tokens cached in this row
        self.owner = None  # the cache_key of the last job here: only a job with the same key may reuse ids
        self.used = 0  # when it was last taken (a step count), to reuse the least recently used free row
        self.logits = self.rng = self.decoder = self.stop = None
        self.step = self.budget = self.next = 0


PREFILL_TOKENS_PER_STEP = 512  # token positions of one step's prefill, padding included (at least one prompt)


class BatchEngine(Queue):
    """Continuous batching (--max-batch N > 1), as vLLM and TGI do it, on CPU-sized terms.

    One worker thread loops over steps. A step first admits waiting jobs, while rows are
    free and their prompts, padded to the longest, fit in PREFILL_TOKENS_PER_STEP tokens
    (always at least one job, as vLLM's token budget per step): each takes a free row, and
    their prompts are computed in one forward (prefill), so a long prompt delays the
    others by its one prefill, and a burst of short ones starts in the same step instead
    of one per step. Then the running rows sample their next tokens, rows with the same
    settings in one call (a seeded row with its own generator's random number), and all
    rows that go on are fed in one batched forward (decode). A row leaves when its answer
    stops, reaches its limit, is cancelled (client gone) or times out; the next newcomer
    takes it. The running rows are always the first `n` rows of self.rows and of the
    cache (a leaving row swaps places with the last running one), so decode reads the
    cache through slices instead of gathering rows by index.

    Prefix cache: a row keeps its tokens after its job leaves. A newcomer with the same
    cache_key (prompt_cache_key) takes the free row that shares the longest prefix with
    its prompt and only computes the rest, so each of up to N conversations keeps its
    cache between turns (the one-at-a-time engine keeps one). Other clients never reuse it.

    Errors: a prefill that fails (e.g. out of memory on a long prompt) fails that request
    only; a failing decode step fails the answers running in it, and the engine goes on."""

    def __init__(self, model, tokenizer, context_len: int, max_batch: int, max_queue: int):
        super().__init__(max_queue)
        self.model, self.tokenizer, self.context_len = model, tokenizer, context_len
        self.cache = batch_cache(model, max_batch, context_len)  # compiled at load where gpt.compile_wanted
        self.rows = [Row() for _ in range(max_batch)]
        self.n = 0  # running rows: self.rows[:n], cache rows 0..n-1
        self.admitting: list[Job] = []  # taken from the queue for this step's prefills (running, not yet in rows)
        self.rng = torch.Generator(device=self.cache.device)  # for requests without a seed
        self.rng.seed()
        self.steps = 0
        threading.Thread(target=self._work, name="generation", daemon=True).start()

    @property
    def slots(self) -> int:
        return len(self.rows)

    @property
    def running(self) -> int:
        return self.n + len(self.admitting)

    @property
    def busy(self) -> bool:
        return self.running > 0

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.busy:
                    self.cond.wait()
                longest = 0  # newcomers of this step: while rows are free and the padded prefill fits the budget
                while self.waiting and self.n + len(self.admitting) < len(self.rows) and (not self.admitting or (
                        len(self.admitting) + 1) * max(longest, len(self.waiting[0].prompt)) <= PREFILL_TOKENS_PER_STEP):
                    self.admitting.append(self.waiting.popleft())
                    longest = max(longest, len(self.admitting[-1].prompt))
            try:
                if self.admitting:
                    self._admit(self.admitting)
                self._step()
            except Exception as e:  # a bug or out of memory: fail the running answers, keep serving
                self._fail(self.rows[:self.n], e)

    def _fail(self, rows: list[Row], e: Exception) -> None:
        log(f"generation failed: {type(e).__name__}: {e}")
        with self.cond:
            for row in rows:
                self.counts["errors"] += 1
                row.job.emit("error", e)
                row.job, row.ids, row.owner = None, [], None
                self.cache.set_length(self.rows.index(row), 0)
                self._swap(self.rows.index(row), self.n - 1)
                self.n -= 1

    def _swap(self, i: int, j: int) -> None:
        if i != j:
            self.cache.swap(i, j)
            self.rows[i], self.rows[j] = self.rows[j], self.rows[i]

    def _admit(self, jobs: list[Job]) -> None:
        """Give each newcomer a free row (rows n, n+1, ...), prefill them all in one forward, and let
        them run. If that forward fails (e.g. out of memory), each prompt is tried alone: only a
        prompt that fails alone fails its request."""
        try:
            jobs = [job for job in jobs if not self.gone(job)]
            start = self.n
            keeps = [self._take_row(job, start + i) for i, job in enumerate(jobs)]
            prompts = [job.prompt[keep:] for job, keep in zip(jobs, keeps)]
            try:
                results = list(prefill(self.model, self.cache, start, keeps, prompts).split(1)) if jobs else []
            except Exception as e:
                if len(jobs) == 1:
                    results = [e]
                else:
                    results = [self._prefill_alone(start + i, keep, prompt)
                               for i, (keep, prompt) in enumerate(zip(keeps, prompts))]
            for i, (job, keep, result) in enumerate(zip(jobs, keeps, results)):
                if isinstance(result, Exception):  # its row stays free
                    log(f"prefill failed: {type(result).__name__}: {result}")
                    self.counts["errors"] += 1
                    self.cache.set_length(start + i, 0)
                    self.rows[start + i].owner = None
                    job.emit("error", result)
                else:  # its row joins the running ones, rows 0..n-1 (past any failed one)
                    self._swap(start + i, self.n)
                    self._start(self.rows[self.n], job, keep, result)
        finally:
            self.admitting.clear()

    def _take_row(self, job: Job, position: int) -> int:
        """Move a free row for the job to `position` (at or after n); how many of its cached tokens to keep."""
        prompt, free = job.prompt, self.rows[position:]
        mine = [r for r in free if job.cache_key is not None and r.owner == job.cache_key]
        if mine:  # this client's longest cached prefix
            row = max(mine, key=lambda r: common_prefix_len(r.ids, prompt))
            keep = min(common_prefix_len(row.ids, prompt), len(prompt) - 1)
        else:  # the least recently used free row; whatever it held is overwritten
            row, keep = min(free, key=lambda r: r.used), 0
        self.steps += 1
        self._swap(self.rows.index(row), position)
        row.used, row.owner, row.ids = self.steps, job.cache_key, []  # ids: none until the prefill is done
        return keep

    def _prefill_alone(self, position: int, keep: int, prompt: list[int]):
        try:
            return prefill(self.model, self.cache, position, [keep], [prompt])
        except Exception as e:
            return e

    def _start(self, row: Row, job: Job, keep: int, logits: torch.Tensor) -> None:
        row.logits, row.ids = logits, list(job.prompt)
        job.reply = Reply(prompt_tokens=len(job.prompt), cached_tokens=keep, dropped_messages=job.dropped)
        if job.seed is not None:  # OpenAI's seed: the same request gives the same answer
            row.rng = torch.Generator(device=self.cache.device)
            row.rng.manual_seed(job.seed)
        row.decoder = self.tokenizer.stream_decoder()
        row.stop = StopSequences(job.sampling.stop)
        row.step, row.budget = 0, min(job.sampling.max_new_tokens, self.context_len - len(job.prompt))
        with self.cond:
            row.job = job
            self.n += 1
            self.admitting.remove(job)

    def _sample(self, rows: list[Row]) -> list[int | None]:
        """The next token of each row (None for a cancelled one): one gpt.sample_next_token call per
        group of rows with the same settings. A seeded row draws its random number from its own
        generator, the others from the engine's, so a seed gives the same answer in any batch."""
        groups = {}
        for i, row in enumerate(rows):
            if not row.job.cancelled.is_set():
                s = row.job.sampling
                repeats = s.frequency_penalty, s.presence_penalty, s.no_repeat_ngram_size
                groups.setdefault((s.sampler(), repeats), []).append(i)
        tokens = [None] * len(rows)
        for members in groups.values():
            s = rows[members[0]].job.sampling
            logits = torch.cat([rows[i].logits for i in members])
            answers = [rows[i].job.reply.ids for i in members]  # each row's answer so far, as GPT.generate counts it
            if s.frequency_penalty or s.presence_penalty:
                logits = gpt.penalize(logits, gpt.token_counts(answers, logits.shape[-1], logits.device),
                                      s.frequency_penalty, s.presence_penalty)
            if s.no_repeat_ngram_size:
                logits = gpt.ban_repeated_ngrams(logits, answers, s.no_repeat_ngram_size)
            uniform = None if s.greedy else torch.cat([torch.rand(
                1, 1, generator=self.rng if rows[i].job.seed is None else rows[i].rng, dtype=torch.float64,
                device=logits.device) for i in members])
            ids = gpt.sample_next_token(logits, *s.sampler(), uniform=uniform)
            for i, token in zip(members, ids.view(-1).tolist()):
                tokens[i] = token
        return tokens

    def _step(self) -> None:
        rows = self.rows[:self.n]
        leaving = []  # (row, finish_reason, timed_out)
        for row, token in zip(rows, self._sample(rows)):
            job = row.job
            if token is None:
                leaving.append((row, "interrupted", False))
                continue
            reply = job.reply
            if reply.ttft is None:
                reply.ttft = time.monotonic() - job.submitted
            if time.monotonic() > job.deadline:  # every token, not only those that complete a piece of text
                leaving.append((row, "interrupted", True))
                continue
            if token in job.stop_ids:
                leaving.append((row, "stop", False))  # not fed: a next turn's prompt brings it
                continue
            reply.ids.append(token)
            row.step += 1
            piece = row.stop.push(row.decoder.push(token))
            if piece:
                job.first_piece = job.first_piece or time.monotonic()
                if self.on_piece is not None:
                    self.on_piece(job)
                if job.cancelled.is_set():
                    leaving.append((row, "interrupted", False))
                    continue
                if time.monotonic() > job.deadline:
                    leaving.append((row, "interrupted", True))
                    continue
                reply.text += piece
                job.emit("piece", piece)
            if row.stop.found:
                leaving.append((row, "stop", False))  # its last token is not fed either
            elif row.step >= row.budget:
                leaving.append((row, "length", False))
            else:
                row.next = token
        for row, finish_reason, timed_out in leaving:
            self._leave(row, finish_reason, timed_out)
        if self.n:
            feed = self.rows[:self.n]  # every running row that did not leave, and only those
            logits = decode(self.model, self.cache, [row.next for row in feed])
            for i, row in enumerate(feed):
                row.logits = logits[i:i + 1]
                row.ids.append(row.next)

    def _leave(self, row: Row, finish_reason: str, timed_out: bool = False) -> None:
        job, reply = row.job, row.job.reply
        if finish_reason in ("stop", "length"):
            tail = row.stop.end(row.decoder)
            if tail:
                reply.text += tail
                job.emit("piece", tail)
        reply.finish_reason = finish_reason
        reply.stop_sequence = row.stop.found if finish_reason == "stop" else None
        with self.cond:
            row.job = None
            if job.cache_key is None:
                row.owner = None  # reusable by nobody
            self._swap(self.rows.index(row), self.n - 1)  # the running rows stay 0..n-1
            self.n -= 1
        self.finish(job, reply, timed_out)


def load_engine_session(checkpoint: str | None, device: str | None, max_batch: int,
                        sampling: Sampling | None = None) -> ChatSession:
    """load_session for make_engine's engine of max_batch rows. The session's own one-row decode step is compiled
    (where gpt.compile_wanted) only for max_batch 1, where the engine decodes on the session's cache: the batched
    engine compiles the step for its own cache (batch_cache), and compiling the session's as well cost load time
    and graph memory for a step that never ran."""
    return load_session(checkpoint, device, sampling, compile_decode=None if max_batch == 1 else False)


def make_engine(session: ChatSession, max_batch: int, max_queue: float):
    """The engine for --max-batch: one answer at a time for 1, else continuous batching."""
    if max_batch > 1:
        return BatchEngine(session.model, session.tokenizer, session.context_len, max_batch, max_queue)
    return Engine(session, max_queue)
