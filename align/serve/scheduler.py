"""Continuous batching: one worker thread decodes every request in flight together.

The asyncio side (:mod:`align.serve.app`) only queues requests and streams what comes back:
:meth:`Scheduler.submit` returns a :class:`Job` whose ``events`` queue receives the text as it
is decoded. The worker thread owns the models. Between two decoding steps it lets waiting
requests join the batch (up to ``max_batch`` rows; their prompts are read in one forward and
merged into the running KV caches) and drops the rows that finished (end of sequence, a stop
string, ``max_tokens``) or whose client went away, so a request never waits for a batch to
drain and a finished one never costs another step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from align.decoding import RowSettings, Sampler
from align.preference import Preference
from align.serve.schema import Generation

log = logging.getLogger("align.serve")

_STOP = object()


@dataclass
class Outcome:
    """How a request ended."""

    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    token_ids: list[int]

    @property
    def usage(self) -> dict[str, int]:
        completion = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


class Job:
    """One request in flight. ``events`` (an asyncio queue, read on the event loop) receives
    ``("text", str)`` pieces, then ``("end", Outcome)`` or ``("error", message)``."""

    def __init__(self, key: int, generation: Generation, served: Any, loop):
        self.key = key
        self.generation = generation
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._served = served
        self._cancelled = threading.Event()
        self.done = False
        self.token_ids: list[int] = []
        self._text_ids: list[int] = []  # the tokens whose text is the answer (no EOS)
        self._sent = 0  # characters of the answer sent so far
        self._hold = max((len(s) for s in generation.stop), default=1) - 1
        seed = generation.seed if generation.seed is not None else random.getrandbits(63)
        self.sampler = Sampler(
            temperature=generation.temperature,
            top_p=generation.top_p,
            generator=None
            if generation.temperature == 0
            else torch.Generator().manual_seed(int(seed)),
        )

    # --- event loop side -------------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: the row leaves the batch at the next step boundary."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # --- worker side -----------------------------------------------------------------------
    def _emit(self, *event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening
            self._cancelled.set()

    def push(self, token: int) -> bool:
        """The row's next token; True when the request is finished (its row leaves)."""
        generation = self.generation
        self.token_ids.append(token)
        if token in self._served.eos_token_ids and not generation.ignore_eos:
            return self._finish("stop", self._served.decode(self._text_ids))
        self._text_ids.append(token)
        text = self._served.decode(self._text_ids)
        if generation.stop:
            start = max(0, self._sent - self._hold - 1)
            hits = [i for s in generation.stop if (i := text.find(s, start)) >= 0]
            if hits:
                return self._finish("stop", text[: min(hits)])
        if len(self.token_ids) >= generation.max_tokens:
            return self._finish("length", text)
        # Hold back what a stop string may still start with, and a character whose bytes
        # are not all decoded yet.
        safe = len(text) - self._hold
        while safe > self._sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > self._sent:
            self._emit("text", text[self._sent : safe])
            self._sent = safe
        return False

    def _finish(self, reason: str, text: str) -> bool:
        if len(text) > self._sent:
            self._emit("text", text[self._sent :])
            self._sent = len(text)
        self.done = True
        self._emit("end", Outcome(reason, len(self.generation.prompt_ids), list(self.token_ids)))
        return True

    def fail(self, message: str) -> None:
        self.done = True
        self._emit("error", message)


@dataclass
class Stats:
    """Counters for ``/health`` (and the tests): what the batching actually did."""

    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    joined_running: int = 0  # requests that joined while other rows were mid-decoding
    peak_rows: int = 0
    decoding: int = 0
    started: float = field(default_factory=time.time)


class Scheduler:
    """The worker thread and the queue of waiting requests."""

    def __init__(self, served: Any, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {max_batch}")
        self.served = served
        self.max_batch = max_batch
        self.stats = Stats()
        self._queue: queue.Queue = queue.Queue()
        self._keys = iter(range(1, 2**62))
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """Whether the model's worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="align-serve-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, generation: Generation) -> Job:
        """Queue a request (called on the event loop); read its events from ``job.events``."""
        if self._thread is None:
            raise RuntimeError("the scheduler is not running")
        job = Job(next(self._keys), generation, self.served, asyncio.get_running_loop())
        self.stats.submitted += 1
        self._queue.put(job)
        return job

    # --- the worker thread -----------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        self._batch = self.served.new_batch()
        self._jobs: dict[int, Job] = {}
        try:
            while True:
                incoming, stopping = self._take()
                if stopping:
                    for job in incoming:
                        job.fail("the server is shutting down")
                    break
                try:
                    self._advance(incoming)
                except Exception as error:  # a bug or out of memory: fail what is in flight
                    log.error("decoding failed:\n%s", traceback.format_exc())
                    affected = {job.key: job for job in [*self._jobs.values(), *incoming]}
                    for job in affected.values():
                        if not job.done:
                            job.fail(f"decoding failed: {type(error).__name__}: {error}")
                    self.stats.failed += len(affected)
                    self._jobs.clear()
                    self._batch.close()
                    self._batch = self.served.new_batch()
                self.stats.decoding = len(self._jobs)
        finally:
            for job in self._jobs.values():
                if not job.done:
                    job.fail("the server is shutting down")
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    item.fail("the server is shutting down")
            self.stats.decoding = 0
            self._batch.close()

    def _take(self) -> tuple[list[Job], bool]:
        """The requests that join at this step boundary (blocking while nothing decodes), and
        whether the server is stopping."""
        incoming: list[Job] = []
        if not self._jobs:
            item = self._queue.get()
            if item is _STOP:
                return incoming, True
            incoming.append(item)
        while len(self._jobs) + len(incoming) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return incoming, True
            incoming.append(item)
        return incoming, False

    def _advance(self, incoming: list[Job]) -> None:
        """One step boundary: cancelled rows leave, ``incoming`` rows join, one token for
        every row, finished rows leave."""
        batch, jobs = self._batch, self._jobs
        gone = [key for key, job in jobs.items() if job.cancelled]
        if gone:
            batch.remove(gone)
            for key in gone:
                jobs.pop(key)
        self.stats.cancelled += len(gone) + sum(job.cancelled for job in incoming)
        incoming = [job for job in incoming if not job.cancelled]
        if incoming:
            running = len(jobs)
            alpha = torch.stack([job.generation.preference.weights for job in incoming])
            batch.add(
                [job.key for job in incoming],
                [job.generation.prompt_ids for job in incoming],
                Preference(alpha, self.served.objectives),
                # The job itself says when it is done (EOS unless ignored, stop strings,
                # max_tokens), as it streams the text.
                [RowSettings(job.sampler, on_token=job.push) for job in incoming],
            )
            jobs.update((job.key, job) for job in incoming)
            if running:
                self.stats.joined_running += len(incoming)
        if not jobs:
            return
        self.stats.peak_rows = max(self.stats.peak_rows, len(jobs))
        self.stats.decoding = len(jobs)
        step = batch.advance()  # finished rows leave the batch at once (drop_finished=0)
        self.stats.steps += 1
        for key in step.finished:
            jobs.pop(key)
        self.stats.finished += len(step.finished)
