"""
engine.py: the model side of serve.py. A queue of generation jobs in front of one model,
and a worker thread that runs them: one at a time (Engine) or continuously batched
(BatchEngine, on a BatchCache), in serve.py's process or in one of its own (EngineProcess).
serve.py is the HTTP side: it parses and checks requests, submits Jobs and turns their
events into OpenAI's responses.

How requests share the model. A model and its KV cache serve one generation at a time
per row, so one worker thread owns them and takes jobs from a FIFO queue; the event loop
only parses requests and forwards text pieces. Each job gets its own asyncio queue, which
the worker fills through `loop.call_soon_threadsafe`: pieces of two answers can never mix,
and a slow generation never blocks other requests from being answered. A job whose client
goes away is marked cancelled: the worker stops it before the next token (or skips it
while it still waits) and moves on.

Continuous batching decodes many sequences at once on one model. gpt.py's KVCache holds B sequences that all sit at the same position, which is what
training-style generation needs. A server's sequences do not: they arrive at different
times with prompts of different lengths. So here:

- BatchCache: keys and values of `rows` sequences, (n_layer, rows, n_kv_head, max_len,
  head_dim), and each row's own length. A row is a slot: a request takes a free one,
  fills it, and leaves it when it ends (its tokens stay, for reuse by the same client).
- decode(): one new token for each of rows 0..n-1 in one forward, through the same
  gpt.GPT.forward: BatchCache.rows(0, n) is a cache whose rows each have their own
  position (rotary angle), write their key and value at their own length, and attend
  to their own keys only (a per-row length mask for SDPA). gpt.py's KVCache documents
  the three things GPT.forward asks of a cache.
- prefill(): the prompts of newcomers, each after its own cached prefix, in one forward
  over their rows, right-padded to the longest (a padding token's key lands after its
  row's length, where no query of that row looks, and the next tokens overwrite it).

In its own process (EngineProcess, serve.py's default): the engine above runs unchanged in a
child process that loads the same checkpoint, and serve.py talks to it through two pipes: jobs
(as plain data, Job.SPEC) and cancellations go there, the jobs' events come back in batches
with the engine's counters. This is how vLLM runs its engine core, and for the same reason: in
one process the event loop's work for every streamed piece (HTTP, JSON, the socket) and the
worker's forward take turns on one interpreter lock, so a decode step of 8 streams also waits
for 8 pieces' worth of HTTP. Apart are both on their own core (bench/RESULTS.md has the numbers).

Exactness: on CPU in fp32, prefill() and decode() give a row the logits of the single-sequence path
up to float rounding (below 1e-5 on the test models: a matmul of B rows, or SDPA over
masked keys, sums in another order), whatever the other rows are. So greedy answers are
the same tokens as alone unless the two best logits of some step lie within that
rounding of each other; tests/test_engine.py and tests/test_serve.py check token equality.
On CUDA with bf16 autocast the rounding is bf16's, and near-ties flip more easily.
"""
import asyncio
import collections
import functools
import itertools
import math
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time

import torch

import chat
import gpt
from gpt import autocast


def log(text: str) -> None:
    """One line on stderr: what went wrong, never a traceback, for things clients cause."""
    print(f"serve: {text}", file=sys.stderr, flush=True)


class QueueFull(Exception):
    """More jobs are waiting than max_queue: serve.py answers 429."""


# -----------------------------------------------------------------------------
# The batch cache: many sequences, each at its own position, on one model

class BatchCache:
    """Keys and values of `rows` sequences, (n_layer, rows, n_kv_head, max_len, head_dim), each row its own length.

    The sequences decoded together are always rows 0..n-1 (BatchEngine keeps them there with
    swap()), so a decode step reads the cache through slices, never copies it by index."""

    def __init__(self, model, rows: int, max_len: int):
        c = model.config
        p = model.lm_head.weight
        dtype = gpt.default_dtype(p.device)  # what autocast (decode, prefill) makes of k and v
        shape = (c.n_layer, rows, c.n_kv_head, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=dtype, device=p.device)
        self.lengths = [0] * rows  # tokens cached per row
        self.max_len = max_len

    def swap(self, i: int, j: int) -> None:
        """Exchange rows i and j (their cached tokens only: a copy of at most the longer one)."""
        n = max(self.lengths[i], self.lengths[j])
        if i != j and n:
            for t in (self.k, self.v):
                row_i = t[:, i, :, :n].clone()
                t[:, i, :, :n] = t[:, j, :, :n]
                t[:, j, :, :n] = row_i
        self.lengths[i], self.lengths[j] = self.lengths[j], self.lengths[i]

    def rows(self, start: int, stop: int) -> "Rows":
        return Rows(self, start, stop)


class Rows:
    """Rows start..stop-1 of a BatchCache, each at its own position, as the cache of one GPT.forward."""

    def __init__(self, cache: BatchCache, start: int, stop: int):
        self.cache, self.start, self.stop, self.n = cache, start, stop, stop - start
        device = cache.k.device
        self.index = torch.arange(self.n, device=device)
        self.lengths = torch.tensor(cache.lengths[start:stop], device=device)
        self.longest = max(cache.lengths[start:stop])
        self.mask = None  # the same for every layer: made by the first

    def positions(self, T: int, device=None) -> torch.Tensor:
        """(n, T): row i's new tokens follow its own cached ones."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write each row's new k, v (n, H_kv, T, D) at its own positions; return the rows' keys and values
        up to the longest row (slices: no copy), and a mask (n, 1, T, Tk) that hides other rows' lengths
        and the future."""
        T = k.shape[2]
        end = self.longest + T
        if end > self.cache.max_len:
            raise ValueError(f"a row of the batch cache is full ({self.cache.max_len} tokens)")
        positions = self.positions(T)
        ck, cv = self.cache.k[layer, self.start:self.stop], self.cache.v[layer, self.start:self.stop]
        ck[self.index[:, None], :, positions] = k.transpose(1, 2).to(ck.dtype)  # (n, T, H_kv, D) into place
        cv[self.index[:, None], :, positions] = v.transpose(1, 2).to(cv.dtype)
        if self.mask is None:  # key j is visible to a query at position p when j <= p
            self.mask = (torch.arange(end, device=k.device)[None, None, :] <= positions[:, :, None])[:, None]
        return ck[:, :, :end], cv[:, :, :end], self.mask

    def advance(self, T: int) -> None:
        for r in range(self.start, self.stop):
            self.cache.lengths[r] += T
        self.lengths += T
        self.longest += T
        self.mask = None


@torch.inference_mode()
def prefill(model, cache: BatchCache, start: int, keeps: list[int], prompts: list[list[int]]) -> torch.Tensor:
    """Rows start, start+1, ...: keep row i's first keeps[i] tokens and compute prompts[i] after
    them, all in one forward; the logits (len(prompts), vocab) after each prompt's last token."""
    stop, T = start + len(prompts), max(len(p) for p in prompts)
    cache.lengths[start:stop] = keeps
    x = torch.tensor([p + p[-1:] * (T - len(p)) for p in prompts], dtype=torch.long, device=cache.k.device)
    with autocast(x.device):
        logits = model(x, kv_cache=cache.rows(start, stop))
    cache.lengths[start:stop] = [keep + len(p) for keep, p in zip(keeps, prompts)]  # the padding is not kept
    return logits[range(len(prompts)), [len(p) - 1 for p in prompts]].float()


@torch.inference_mode()
def decode(model, cache: BatchCache, tokens: list[int]) -> torch.Tensor:
    """Feed tokens[i] to row i, all in one forward; the next logits, (len(tokens), vocab)."""
    x = torch.tensor(tokens, dtype=torch.long, device=cache.k.device)[:, None]
    with autocast(x.device):
        logits = model(x, kv_cache=cache.rows(0, len(tokens)))[:, -1]
    return logits.float()


# -----------------------------------------------------------------------------
# Jobs, the queue, and the two engines

class RequestTimeout(Exception):
    """A request outlived --request-timeout (waiting and generating together)."""


def completion_tokens(reply: chat.Reply) -> int:
    """The one rule for counting generated tokens, in usage and in /health: every sampled
    token, including the stop token that ends an answer (OpenAI counts it too), though it is no text."""
    return len(reply.ids) + (reply.finish_reason == "stop")


FINAL = ("done", "error", "cancelled")  # a job's last event: it has no more after one of these


class Job:
    """One request's generation. The worker reports through `emit`: ("piece", text)..., then
    ("done", chat.Reply) or ("error", exception), or ("cancelled", None) when it is dropped
    before it starts; by default into `events`, an asyncio queue of the event loop that made the job.

    What to generate is plain data (SPEC), so a job can be sent to the engine process:
    prompt (token ids, what the batched engine feeds), sampling, seed, and for the one-at-a-time
    engine's ChatSession either `messages` (chat) or `text` (completion). cache_key: whose KV
    cache this request may reuse (None: nobody's). deadline: time.monotonic() after which the
    worker drops the job with RequestTimeout."""

    SPEC = ("prompt", "sampling", "seed", "cache_key", "deadline", "stop_ids", "dropped", "messages", "text", "submitted")

    def __init__(self, prompt: list[int], sampling: chat.Sampling, seed: int | None = None, cache_key=None,
                 deadline: float = math.inf, stop_ids=(), dropped: int = 0, messages: list[dict] | None = None,
                 text: str | None = None, submitted: float | None = None, deliver=None):
        self.prompt, self.sampling, self.seed, self.cache_key, self.deadline = prompt, sampling, seed, cache_key, deadline
        self.stop_ids, self.dropped, self.messages, self.text = stop_ids, dropped, messages, text
        self.reply: chat.Reply | None = None  # the answer so far, once the job runs
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

    def generate(self, session: chat.ChatSession):
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

    def finished(self, job: Job, reply: chat.Reply) -> None:
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

    def finish(self, job: Job, reply: chat.Reply, timed_out: bool = False) -> None:
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

    def __init__(self, session: chat.ChatSession, max_queue: int):
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
        self.finish(job, s.last, timed_out)



class Row:
    """One slot of the batch: the job it serves (None: free) and the tokens its KV cache row holds."""

    def __init__(self):
        self.job: Job | None = None
        self.ids: list[int] = []  # exactly the tokens cached in this row
        self.owner = None  # the cache_key of the last job here: only a job with the same key may reuse ids
        self.used = 0  # when it was last taken (a step count), to reuse the least recently used free row
        self.logits = self.rng = self.decoder = None
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
        self.cache = BatchCache(model, max_batch, context_len)
        self.rows = [Row() for _ in range(max_batch)]
        self.n = 0  # running rows: self.rows[:n], cache rows 0..n-1
        self.admitting: list[Job] = []  # taken from the queue for this step's prefills (running, not yet in rows)
        self.rng = torch.Generator(device=self.cache.k.device)  # for requests without a seed
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
                self.cache.lengths[self.rows.index(row)] = 0
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
                    self.cache.lengths[start + i], self.rows[start + i].owner = 0, None
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
            row = max(mine, key=lambda r: chat.common_prefix_len(r.ids, prompt))
            keep = min(chat.common_prefix_len(row.ids, prompt), len(prompt) - 1)
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
        job.reply = chat.Reply(prompt_tokens=len(job.prompt), cached_tokens=keep, dropped_messages=job.dropped)
        if job.seed is not None:  # OpenAI's seed: the same request gives the same answer
            row.rng = torch.Generator(device=self.cache.k.device)
            row.rng.manual_seed(job.seed)
        row.decoder = self.tokenizer.stream_decoder()
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
                groups.setdefault((s.temperature, s.top_k, s.top_p) if s.temperature else "greedy", []).append(i)
        tokens = [None] * len(rows)
        for members in groups.values():
            s = rows[members[0]].job.sampling
            logits = torch.cat([rows[i].logits for i in members])
            uniform = None if not s.temperature else torch.cat([torch.rand(
                1, 1, generator=self.rng if rows[i].job.seed is None else rows[i].rng, dtype=torch.float64,
                device=logits.device) for i in members])
            ids = gpt.sample_next_token(logits, s.temperature, s.top_k or None, s.top_p, uniform=uniform)
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
            piece = row.decoder.push(token)
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
            if row.step >= row.budget:
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
            tail = row.decoder.flush()  # bytes of an unfinished character, shown as U+FFFD
            if tail:
                reply.text += tail
                job.emit("piece", tail)
        reply.finish_reason = finish_reason
        with self.cond:
            row.job = None
            if job.cache_key is None:
                row.owner = None  # reusable by nobody
            self._swap(self.rows.index(row), self.n - 1)  # the running rows stay 0..n-1
            self.n -= 1
        self.finish(job, reply, timed_out)


def make_engine(session: chat.ChatSession, max_batch: int, max_queue: float):
    """The engine for --max-batch: one answer at a time for 1, else continuous batching."""
    if max_batch > 1:
        return BatchEngine(session.model, session.tokenizer, session.context_len, max_batch, max_queue)
    return Engine(session, max_queue)


# -----------------------------------------------------------------------------
# The engine in a process of its own

STATS_SECONDS = 0.1  # the engine process sends its counters this often when they changed without an event


def engine_process(commands, events, checkpoint: str, device: str | None, max_batch: int) -> None:
    """The engine process's main (EngineProcess starts it): load the model, run an engine on it, and relay.

    In come ("submit", id, Job.spec()) and ("cancel", id); out go ("ready", device, stats) or ("failed",
    message) once, then ("events", [(id, event), ...], stats): what the jobs emitted, and the engine's counters."""
    # Ctrl-C in a terminal and systemd's stop signal reach every process of the group: serve.py
    # stops gracefully, letting answers finish, and then closes our pipe, which is our end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        session = chat.load_session(checkpoint, device)
    except SystemExit as e:  # load_session's clear "error: ..." messages
        events.send(("failed", str(e)))
        return
    if session.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))  # a core stays with serve.py's HTTP side
    engine = make_engine(session, max_batch, math.inf)  # EngineProcess.submit applies --max-queue
    events.send(("ready", str(session.device), engine_stats(engine)))
    outbox = Outbox(events, engine)
    jobs = {}
    while True:
        try:
            kind, job_id, *spec = commands.recv()
        except EOFError:  # serve.py is gone (or closed us): so are its clients
            return
        if kind == "submit":
            job = jobs[job_id] = Job(**spec[0], deliver=functools.partial(outbox.put, job_id, jobs))
            job.on_finish = functools.partial(job.emit, "finished")  # the tokens to charge, before "done"
            engine.submit(job)
        elif kind == "cancel" and (job := jobs.get(job_id)) is not None:
            engine.cancel(job)


class Outbox:
    """The engine process's events on their way to serve.py. A thread sends whatever has gathered
    in one message (a step's pieces for all rows cost one write), with the engine's counters; and the
    counters alone when they changed without an event (checked every STATS_SECONDS)."""

    def __init__(self, conn, engine: Queue):
        self.conn, self.engine = conn, engine
        self.pending, self.cond = [], threading.Condition()
        threading.Thread(target=self._send, name="events", daemon=True).start()

    def put(self, job_id: int, jobs: dict, event: tuple) -> None:
        """A job's event; after its last one, the job leaves `jobs` (the engine process's open jobs by id)."""
        if event[0] in FINAL:
            jobs.pop(job_id, None)
        with self.cond:
            self.pending.append((job_id, event))
            self.cond.notify()

    def _send(self) -> None:
        sent = None
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending, timeout=STATS_SECONDS)
                pending, self.pending = self.pending, []
            stats = engine_stats(self.engine)
            if pending or stats != sent:
                self.conn.send(("events", [(i, portable(e)) for i, e in pending], stats))
                sent = stats


def engine_stats(engine: Queue) -> dict:
    """What EngineProcess reports of the engine (metrics: the engine's own object, so it compares equal
    until the counts change, which is when it changes)."""
    return dict(counts=dict(engine.counts), queued=engine.queued, running=engine.running, metrics=engine.metrics)


def portable(event: tuple) -> tuple:
    """An event that pickles: an exception that does not becomes a RuntimeError with its text."""
    kind, value = event
    if isinstance(value, Exception):
        try:
            pickle.loads(pickle.dumps(value))
        except Exception:
            return kind, RuntimeError(f"{type(value).__name__}: {value}")
    return event


class EngineProcess:
    """serve.py's engine in a process of its own, as vLLM runs its engine core: the event loop
    (HTTP, JSON, server-sent events) and the worker thread (the model) no longer take turns on
    one interpreter lock. In one process, a step of 8 streams waits for the event loop's work on
    8 pieces; measured in bench/RESULTS.md.

    The engine process loads the same checkpoint and runs Engine or BatchEngine as they are;
    this side has their interface (submit, cancel, queued, running, busy, counts, metrics). Jobs
    go there as their SPEC, their events come back in one message per batch (Outbox), and are
    passed on to each job's own queue. --max-queue is applied here with the engines' rule,
    which counts only jobs not yet finished: waiting + running >= max_queue + rows. If the
    engine process dies, every open request gets an error and `on_exit` is called (serve.py
    stops, so that systemd restarts it)."""

    def __init__(self, checkpoint: str, device: str | None, max_batch: int, max_queue: int):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA cannot start in a forked one
        self.events, events_out = ctx.Pipe(duplex=False)
        commands_in, self.commands = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=engine_process, args=(commands_in, events_out, checkpoint, device, max_batch),
                                   name="nanoschnack-engine", daemon=True)
        self.process.start()
        commands_in.close()
        events_out.close()  # ours: so that recv() ends with EOFError when the engine process is gone
        try:
            kind, detail, *stats = self.events.recv()
        except EOFError:
            self.process.join(10)
            raise SystemExit(f"error: the engine process exited with code {self.process.exitcode} while loading "
                             f"{checkpoint} (its messages are above)")
        if kind == "failed":
            raise SystemExit(detail)
        self.device, self.max_queue, self.slots = detail, max_queue, max_batch
        self.jobs: dict[int, Job] = {}  # submitted, not finished
        self.ids = itertools.count()
        self.rejected = 0
        self.stats = stats[0]
        self.closing, self.died, self.on_exit = False, False, None
        self.lock = threading.Lock()  # one writer at a time on the command pipe
        threading.Thread(target=self._receive, name="engine-events", daemon=True).start()

    def submit(self, job: Job) -> None:
        if self.died:  # serve.py is stopping
            raise RuntimeError("the engine process exited")
        if len(self.jobs) >= self.max_queue + self.slots:
            self.rejected += 1
            raise QueueFull(f"the server is busy: {len(self.jobs) - self.slots} requests are waiting already "
                            f"(--max-queue {self.max_queue}); try again in a moment")
        job.id = next(self.ids)
        self.jobs[job.id] = job
        self._send(("submit", job.id, job.spec()))

    def cancel(self, job: Job) -> None:
        """As the engines' cancel: its end ("cancelled" or "done") comes back as an event."""
        if job.id in self.jobs and not job.cancelled.is_set():
            job.cancelled.set()
            self._send(("cancel", job.id))

    def _send(self, command: tuple) -> None:
        with self.lock:
            try:
                self.commands.send(command)
            except OSError:  # the engine process is gone: _receive fails the jobs
                pass

    def _receive(self) -> None:
        while True:
            try:
                _, events, self.stats = self.events.recv()
            except (EOFError, OSError):
                return self._engine_gone()
            for job_id, (kind, value) in events:
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                if kind == "finished":  # the tokens it generated, for the rate limits
                    if job.on_finish is not None:
                        job.on_finish(value)
                    continue
                if kind in FINAL:
                    del self.jobs[job_id]
                job.emit(kind, value)

    def _engine_gone(self) -> None:
        if self.closing:
            return
        self.died = True
        self.process.join(5)
        log(f"the engine process exited (code {self.process.exitcode}): failing {len(self.jobs)} open requests "
            f"and stopping")
        for job in list(self.jobs.values()):
            job.emit("error", RuntimeError("the engine process exited"))
        self.jobs.clear()
        if self.on_exit is not None:
            self.on_exit()

    def close(self) -> None:
        """Stop the engine process (serve.py, on shutdown)."""
        self.closing = True
        self.commands.close()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()

    @property
    def counts(self) -> collections.Counter:
        return collections.Counter({**self.stats["counts"], "rejected": self.rejected})

    @property
    def metrics(self) -> Metrics:
        return self.stats["metrics"]

    @property
    def queued(self) -> int:
        return self.stats["queued"]

    @property
    def running(self) -> int:
        return self.stats["running"]

    @property
    def busy(self) -> bool:  # as both engines': something runs
        return self.running > 0


async def job_events(job: Job, idle_seconds: float):
    """The job's events as they come; ("idle", None) after idle_seconds without one."""
    while True:
        try:
            async with asyncio.timeout(idle_seconds):  # a cancelled get() loses no event
                kind, value = await job.events.get()
        except TimeoutError:
            yield "idle", None
            continue
        yield kind, value
        if kind in FINAL:
            return
