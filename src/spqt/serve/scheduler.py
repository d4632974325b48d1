"""A FIFO queue of generation jobs and the one worker thread that runs them on the model.

The HTTP side (asyncio) submits a Job and reads its events; the worker runs one job at a time, in
arrival order, and posts each job's events to that job's own asyncio queue, so two requests'
tokens can never mix. A job cancelled while queued is dropped unrun; one cancelled while running
ends at its next token (the engine checks job.cancelled before every decode step and, on the CPU, before each layer of
its prompt's prefill).
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spqt.errors import SpqtError

log = logging.getLogger("spqt.serve")


@dataclass
class Job:
    """One request's work. prompt: token ids; max_tokens: 0 with an echo alone; logprobs: how many most likely tokens
    each answer token's logprobs list (None: no logprobs). echo: the prompt's text, returned before the answer (its
    tokens' logprobs too where logprobs asks for them), whose first prompt_added tokens (a BOS the server put before
    the client's text) it does not hold. Events, in order: ("text", (piece, tokens)) (tokens:
    spqt.serve.logprobs.TokenLogprob entries, [] without logprobs; with an echo the first piece is the prompt's text),
    then one of ("done", GenerationResult), ("cancelled", None) or ("error", message). on_finish: called once it
    ends in the engine (report), before its last event."""

    prompt: list[int]
    max_tokens: int
    sampling: Any  # spqt.generate.Sampling
    stops: list[str]
    label: str  # for the log line, e.g. "POST /v1/completions"
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
    echo: str | None = None
    prompt_added: int = 0
    on_finish: Any = None  # (result, None where it failed; seconds in the engine, cancelled): its app's metrics
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    client_gone: threading.Event = field(default_factory=threading.Event)  # why it was cancelled: set, the client left
    reported: bool = field(default=False, init=False)  # on_finish was called
    stop_found: str | None = field(default=None, init=False)  # the stop string that ended it (set before "done")

    def report(self, result: Any, seconds: float) -> None:
        """Call on_finish once (result: the GenerationResult, None where the job failed). A hook that raises is
        logged, never raised: it must not replace the job's own answer or error."""
        if self.on_finish is None or self.reported:
            return
        self.reported = True
        try:
            self.on_finish(result, seconds, self.cancelled.is_set())
        except Exception:
            log.exception("%s: its finish hook (metrics) failed", self.label)

    def emit(self, kind: str, value: Any = None) -> None:
        """Post an event from the worker thread to the HTTP side. The last event marks the job finished
        first, so that the HTTP side, which cancels a job once it stops reading, never cancels one it
        read to the end (a stream would lose its `data: [DONE]`). Where the HTTP side's loop is closed (the server
        stopped before the job's last token), no one reads the event: it is dropped."""
        if kind != "text":
            self.finished.set()
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # "Event loop is closed" (the worker's traceback, twice, at the end of the log)
            if not self.loop.is_closed():
                raise

    def cancel(self, client_gone: bool = False) -> None:
        """Client gone or server stopping: drop the job or end it at its next token (no-op once finished)."""
        if not self.finished.is_set():
            if client_gone and not self.cancelled.is_set():  # the first reason given stays
                self.client_gone.set()
            self.cancelled.set()

    @property
    def cancel_reason(self) -> str:
        """Why a cancelled job was cancelled, for the log: "client gone" or "server stopping"."""
        return "client gone" if self.client_gone.is_set() else "server stopping"


class Scheduler:
    """run(job) does the work on the worker thread, posts the job's events and returns "completed" or
    "cancelled"; Scheduler posts ("cancelled", None) for jobs it drops and ("error", message) when run
    raises (a SpqtError: its message, one log line; anything else: its type too, and the traceback in the log),
    after reporting the failed job (Job.report with no result)."""

    def __init__(self, run: Callable[[Job], str]):
        self._run = run
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: list[Job] = []
        self.running: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.stopping = False  # cancel_all was called: every job submitted from then on is cancelled at once
        self._thread = threading.Thread(target=self._work, name="spqt-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.stopping:  # (a batch's next prompt, submitted after its first finished)
                job.cancel()
            self._waiting.append(job)
        self._queue.put(job)

    def stats(self) -> dict:
        with self._lock:
            return {"waiting": len(self._waiting), "running": self.running is not None, **self.counts}

    def cancel_all(self) -> None:
        """The server stops: what waits and runs is cancelled, and whatever is submitted after."""
        with self._lock:
            self.stopping = True
            jobs = self._waiting + ([self.running] if self.running else [])
        for job in jobs:
            job.cancel()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and stop the worker (it finishes the token it is on)."""
        self.cancel_all()
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting.remove(job)
                self.running = job
            outcome, start = "completed", time.perf_counter()
            try:
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    job.emit("cancelled")
                    log.info("%s cancelled (%s) while queued", job.label, job.cancel_reason)
                else:
                    outcome = self._run(job)
            except SpqtError as e:  # what the runtime says of this request (e.g. logits that are not finite)
                outcome = "failed"
                log.error("%s failed: %s", job.label, e)
                job.report(None, time.perf_counter() - start)
                job.emit("error", f"generation failed: {e}")
            except Exception as e:  # a bug or an out-of-memory must not stop the server
                outcome = "failed"
                log.exception("%s failed", job.label)
                job.report(None, time.perf_counter() - start)
                job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self.running = None
                    self.counts[outcome] += 1
                job.finished.set()
