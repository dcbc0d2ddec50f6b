"""
engine_process.py: serve.py's engine (engine.py's Engine or BatchEngine) in a process of its own
(EngineProcess, serve.py's default). The engine runs unchanged in a child process that loads the same checkpoint, and serve.py talks to it through two pipes: jobs
(as plain data, Job.SPEC) and cancellations go there, the jobs' events come back in batches
with the engine's counters. This is how vLLM runs its engine core, and for the same reason: in
one process the event loop's work for every streamed piece (HTTP, JSON, the socket) and the
worker's forward take turns on one interpreter lock, so a decode step of 8 streams also waits
for 8 pieces' worth of HTTP. Apart are both on their own core (bench/RESULTS.md has the numbers).

The watchdog: the engine process sends a message at least every HEARTBEAT_SECONDS, carrying
the time of its engine's last progress (an event of any job; an idle engine counts as making
progress). A process that is stopped (SIGSTOP, swapped out) sends nothing, and one whose worker
is stuck sends an old time: either way serve.py sees no progress, and after stall_seconds
(--stall-timeout) EngineProcess.stalled is true: /health answers 503 "stalled", /metrics says so,
and it is logged. Requests are not failed for it: each ends at its --request-timeout, which
serve.py keeps itself.
"""
import collections
import functools
import itertools
import math
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time

import torch

from engine import FINAL, Job, Metrics, Queue, QueueFull, load_engine_session, log, make_engine

STATS_SECONDS = 0.1  # the engine process sends its counters this often when they changed without an event
HEARTBEAT_SECONDS = 1.0  # and a message at least this often, so that silence means a stopped process
STALL_SECONDS = 60.0  # --stall-timeout's default: longer than any one step (a prefill of 512 tokens, a
# decode of 8 rows) of a model this project trains, on a GPU or a CPU, with room for a slow first one


class EngineGone(Exception):
    """The engine process has exited: serve.py answers 503 until it has stopped too."""


def engine_process(commands, events, checkpoint: str, device: str | None, max_batch: int) -> None:
    """The engine process's main (EngineProcess starts it): load the model, run an engine on it, and relay.

    In come ("submit", id, Job.spec()) and ("cancel", id); out go ("ready", device, stats) or ("failed",
    message) once, then ("events", [(id, event), ...], stats, progress): what the jobs emitted, the engine's
    counters, and the time.monotonic() of its last progress (the clock all processes of a machine share)."""
    # Ctrl-C in a terminal and systemd's stop signal reach every process of the group: serve.py
    # stops gracefully, letting answers finish, and then closes our pipe, which is our end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        session = load_engine_session(checkpoint, device, max_batch)
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
    in one message (a step's pieces for all rows cost one write), with the engine's counters; the
    counters alone when they changed without an event (checked every STATS_SECONDS); and at least
    one message every HEARTBEAT_SECONDS. Each carries `progress`: when the engine last emitted an
    event, or now if it has nothing to do."""

    def __init__(self, conn, engine: Queue):
        self.conn, self.engine = conn, engine
        self.pending, self.cond = [], threading.Condition()
        self.progress = time.monotonic()
        threading.Thread(target=self._send, name="events", daemon=True).start()

    def put(self, job_id: int, jobs: dict, event: tuple) -> None:
        """A job's event; after its last one, the job leaves `jobs` (the engine process's open jobs by id)."""
        if event[0] in FINAL:
            jobs.pop(job_id, None)
        with self.cond:
            self.pending.append((job_id, event))
            self.progress = time.monotonic()
            self.cond.notify()

    def _send(self) -> None:
        sent, sent_at = None, 0.0
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending, timeout=STATS_SECONDS)
                pending, self.pending = self.pending, []
            stats, now = engine_stats(self.engine), time.monotonic()
            if not (stats["running"] or stats["queued"]):
                self.progress = now  # an engine with nothing to do is not stuck
            if pending or stats != sent or now - sent_at >= HEARTBEAT_SECONDS:
                self.conn.send(("events", [(i, portable(e)) for i, e in pending], stats, self.progress))
                sent, sent_at = stats, now


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
    go there as their SPEC, written by a thread of their own (a pipe holds 64 KiB: a long
    conversation to a stopped engine process would otherwise block the event loop), and their
    events come back in one message per batch (Outbox), passed on to each job's own queue.
    --max-queue is applied here with the engines' rule, which counts only jobs not yet finished:
    waiting + running >= max_queue + rows. The watchdog: module docstring. If the engine process
    dies, every open request gets an EngineGone error, later ones are refused with it, and the
    callback given to set_on_exit is called (serve.py stops, so that systemd restarts it)."""

    def __init__(self, checkpoint: str, device: str | None, max_batch: int, max_queue: int,
                 stall_seconds: float = STALL_SECONDS):
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
        self.stall_seconds, self.progress, self.stall_logged = stall_seconds, time.monotonic(), False
        self.closing, self.died, self.on_exit = False, False, None
        self.lock = threading.Lock()  # submit against _engine_gone: a job is failed by one or refused by the other
        self.outgoing = queue.SimpleQueue()  # commands for the writer thread; None closes the pipe
        threading.Thread(target=self._write, name="engine-commands", daemon=True).start()
        self.receiver = threading.Thread(target=self._receive, name="engine-events", daemon=True)
        self.receiver.start()

    def set_on_exit(self, callback) -> None:
        """Call `callback` once the engine process has exited, or now if it has already: it can die any time
        after "ready" (the OOM killer), also while serve.py still builds its app, and a callback set only
        afterwards was never called (serve.py ran on with a dead engine, never restarted). Under the lock
        that _engine_gone takes to set `died`, so one of the two calls it, exactly once."""
        with self.lock:
            self.on_exit = callback
            gone = self.died
        if gone:
            callback()

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.died:  # serve.py is stopping
                raise EngineGone("the engine process exited; this server is stopping")
            if len(self.jobs) >= self.max_queue + self.slots:
                self.rejected += 1
                raise QueueFull(f"the server is busy: {len(self.jobs) - self.slots} requests are waiting already "
                                f"(--max-queue {self.max_queue}); try again in a moment")
            job.id = next(self.ids)
            self.jobs[job.id] = job
        self.outgoing.put(("submit", job.id, job.spec()))

    def cancel(self, job: Job) -> None:
        """As the engines' cancel: its end ("cancelled" or "done") comes back as an event."""
        if job.id in self.jobs and not job.cancelled.is_set():
            job.cancelled.set()
            self.outgoing.put(("cancel", job.id))

    def _write(self) -> None:
        while (command := self.outgoing.get()) is not None:
            try:
                self.commands.send(command)
            except OSError:  # the engine process is gone: _receive fails the jobs
                pass
        self.commands.close()

    def _receive(self) -> None:
        while True:
            try:
                if not self.events.poll(HEARTBEAT_SECONDS):
                    self._watch()
                    continue
                _, events, self.stats, self.progress = self.events.recv()
            except (EOFError, OSError):
                return self._engine_gone()
            self._watch()
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

    def _watch(self) -> None:
        """Log when the engine process stops making progress, and when it starts again."""
        stalled = self.stalled
        if stalled != self.stall_logged:
            self.stall_logged = stalled
            log(f"the engine process has made no progress for {self.quiet_seconds:.0f} s (--stall-timeout "
                f"{self.stall_seconds:g}): /health says stalled; open requests end at --request-timeout"
                if stalled else "the engine process makes progress again")

    def _engine_gone(self) -> None:
        if self.closing:
            return
        with self.lock:
            self.died = True
            jobs, self.jobs = list(self.jobs.values()), {}
            on_exit = self.on_exit  # None: set_on_exit calls it when it comes
        self.process.join(5)
        log(f"the engine process exited (code {self.process.exitcode}): failing {len(jobs)} open requests "
            f"and stopping")
        for job in jobs:
            job.emit("error", EngineGone("the engine process exited"))
        if on_exit is not None:
            on_exit()

    def close(self) -> None:
        """Stop the engine process (serve.py, on shutdown): closing its pipe ends it. Then the events thread
        ends too; waiting for it lets a dead engine process's exit code be logged before serve.py exits."""
        self.closing = True
        self.outgoing.put(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
        self.receiver.join(10)

    @property
    def quiet_seconds(self) -> float:
        """Seconds since the engine process last made progress (or said it had nothing to do)."""
        return max(0.0, time.monotonic() - self.progress)

    @property
    def stalled(self) -> bool:
        return not self.died and self.quiet_seconds > self.stall_seconds

    @property
    def counts(self) -> collections.Counter:
        return collections.Counter({**self.stats["counts"], "rejected": self.rejected})

    @property
    def metrics(self) -> Metrics:
        return self.stats["metrics"]

    @property
    def queued(self) -> int:
        """Jobs submitted and not running: the engine's waiting line, and what has not reached it yet
        (all of them while the engine process is stopped)."""
        return max(0, len(self.jobs) - self.running)

    @property
    def running(self) -> int:
        return self.stats["running"]

    @property
    def busy(self) -> bool:  # as both engines': something runs
        return self.running > 0
