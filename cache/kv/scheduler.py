"""Iteration-level (continuous) batching of all streams' model work: one step loop, one batched forward per kind.

Work arrives as session coroutines (:mod:`cache.kv.session`): a stream prefix, a chunk, a question. Each stream has
a FIFO of tasks; only its head task runs, so a stream's chunks stay in order and **an answer sees exactly the
chunks appended before the question was asked** (a chunk mid-prefill when the question arrives is finished first;
a chunk appended during the answer waits for it). Streams never wait on each other.

One **step** of the loop:

1. cancelled tasks (client disconnect, stream close) are closed -- the answer's scratch KV is rolled back now;
2. **decode micro-batch**: one token for every answer in flight (up to ``max_batch_rows`` rows), ``[B, 1]``;
3. **prefill micro-batch**: question and chunk prefills, ``token_budget`` real tokens at most (chunked prefill:
   a longer piece continues next step; exact, since attention is causal), up to ``max_batch_rows`` rows, padded to
   the longest slice. Order: chunks that have waited ``max_ingest_wait_steps`` steps (ageing: ingest is never
   starved), then questions (time to first token) if ``questions_first``, then oldest first.

Rows of one forward belong to different streams with different KV lengths: :class:`~cache.kv.kvcache.RowsCache`
appends each row to its own stream's buffer and :func:`~cache.kv.kvcache.ragged_mask` gives the exact 4-D mask,
so a batched row computes what it would alone (float rounding aside). Decode and prefill run as two forwards of one
step because HF's dense attention has no ragged packing: a decode row padded to a prefill's length would cost that
many tokens of compute. A piece with family extras (opaque decoder inputs, e.g. DeepStack features) runs alone (batch of one, whole piece).

Threads: callers only enqueue and wait; a single loop thread (started on demand, gone when idle) does all model
work and all KV buffer edits, so sessions need no locks.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from cache.kv.config import SchedulerConfig
from cache.kv.forward import Forward, Work, run_batch
from stream.models.llm import TextLM

_END = object()  # end of an answer's token queue
log = logging.getLogger(__name__)
LOOP_THREAD = "kv-step-loop"


@dataclass(eq=False)
class Task:
    """One unit of a stream's work (prefix, chunk, question) and how its caller is answered."""

    stream_id: str
    kind: str  # "prefix" | "chunk" | "question"
    work: Work
    seq: int
    arrival_step: int
    pending: Forward | None = None
    done: int = 0  # tokens of ``pending`` already prefilled (chunked prefill)
    forwards: int = 0
    started: bool = False
    cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    tokens: "queue.SimpleQueue[Any] | None" = None  # questions: generated ids, then _END
    finish_step: int | None = None  # the step count when the task finished (tests of cross-stream delay)

    @property
    def decoding(self) -> bool:
        return self.kind == "question" and self.forwards > 1

    def finish(self, error: BaseException | None = None) -> None:
        self.error, self.pending = error, None
        if self.tokens is not None:
            self.tokens.put(_END)
        self.finished.set()


@dataclass
class SchedulerStats:
    """Counters of the step loop (a snapshot)."""

    steps: int = 0
    decode_rows: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0
    max_rows_in_step: int = 0
    queued_tasks: int = 0


class Scheduler:
    """The step loop over every stream's task queue.

    Args:
        llm: the shared model.
        config: batching policy.
    """

    def __init__(self, llm: TextLM, config: SchedulerConfig) -> None:
        self.llm, self.cfg = llm, config
        self._cond = threading.Condition()
        self._queues: dict[str, list[Task]] = {}
        self._cancelled: list[Task] = []
        self._after_step: list[Callable[[], None]] = []
        self._running = False
        self._thread: threading.Thread | None = None
        self._held = 0
        self._seq = itertools.count()
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ callers' side
    def submit(self, stream_id: str, kind: str, work: Work, answer: bool = False) -> Task:
        """Queue ``work`` behind the stream's earlier tasks; returns its task (wait with :meth:`wait`)."""
        task = Task(stream_id, kind, work, next(self._seq), self.stats.steps)
        if answer:
            task.tokens = queue.SimpleQueue()
        with self._cond:
            self._queues.setdefault(stream_id, []).append(task)
            self._wake()
        return task

    @staticmethod
    def wait(task: Task) -> None:
        """Block until ``task`` is done; re-raise its error."""
        task.finished.wait()
        if task.error is not None:
            raise task.error

    def cancel(self, task: Task) -> None:
        """Stop ``task`` at the next step boundary (an answer's scratch KV is rolled back then)."""
        with self._cond:
            if not task.finished.is_set() and not task.cancelled:
                task.cancelled = True
                self._cancelled.append(task)
                self._wake()

    def cancel_stream(self, stream_id: str, error: BaseException, then: Callable[[], None]) -> None:
        """Cancel every task of ``stream_id``, then run ``then`` on the loop thread. Waiting appends get ``error``;
        answers end quietly after the tokens generated so far."""
        with self._cond:
            for task in self._queues.get(stream_id, []):
                if not task.cancelled:
                    task.cancelled, task.error = True, (None if task.tokens is not None else error)
                    self._cancelled.append(task)
            self._after_step.append(then)
            self._wake()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the loop at the next step boundary while inside: a burst of work submitted meanwhile (N clients
        asking at once) is scheduled together when it ends."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify()

    def _wake(self) -> None:
        """(under the lock) start the loop thread if it is not running, else wake it."""
        if not self._running:
            self._running = True
            # intra-op threads are per OS thread in torch: the loop uses as many as its starter was set to use
            threads = torch.get_num_threads()
            self._thread = threading.Thread(target=self._loop, args=(threads,), name=LOOP_THREAD, daemon=True)
            self._thread.start()
        self._cond.notify()

    def wait_stopped(self, timeout_s: float = 30.0) -> bool:
        """Wait until the loop thread ran out of work and exited; ``False`` on timeout. Call it before the process
        exits: a daemon thread still inside a torch op while the interpreter finalizes can abort the process."""
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    # ------------------------------------------------------------------ the loop
    def _loop(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while True:
            with self._cond:
                while self._held:
                    self._cond.wait()
                cancelled, self._cancelled = self._cancelled, []
                after, self._after_step = self._after_step, []
                for task in cancelled:
                    self._remove(task)
                heads = [q[0] for q in self._queues.values() if q]
                if not heads and not cancelled and not after:
                    self._running = False
                    return
            for task in cancelled:
                try:
                    task.work.close()  # runs the session's finally: rolls the answer's scratch KV back
                finally:
                    task.finish(task.error)
            for fn in after:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a failed callback must not stop every stream's work
                    log.exception("step loop: post-step callback failed")
            if heads:
                try:
                    self._step(heads)
                except Exception as exc:  # noqa: BLE001 - a bug fails the step's tasks, never the loop
                    log.exception("step loop: step failed")
                    for task in heads:
                        self._fail(task, exc)

    def _remove(self, task: Task) -> None:
        q = self._queues.get(task.stream_id)
        if q is not None and task in q:
            q.remove(task)
            if not q:
                del self._queues[task.stream_id]

    def _step(self, heads: list[Task]) -> None:
        for task in heads:
            if not task.started and not task.cancelled:
                task.started = True
                self._advance(task, None)
        live = [t for t in heads if t.pending is not None and not t.cancelled]
        decodes = [t for t in live if t.decoding][: self.cfg.max_batch_rows]
        prefills = self._pick_prefills([t for t in live if not t.decoding])
        if decodes:
            self._run([(t, 0, 1) for t in decodes])
            self.stats.decode_rows += len(decodes)
        if prefills:
            self._run(prefills)
            self.stats.prefill_rows += len(prefills)
            self.stats.prefill_tokens += sum(e - s for _, s, e in prefills)
        self.stats.steps += 1
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, len(decodes), len(prefills))
        with self._cond:
            self.stats.queued_tasks = sum(len(q) for q in self._queues.values())

    def _pick_prefills(self, tasks: list[Task]) -> list[tuple[Task, int, int]]:
        return pick_prefills(tasks, self.stats.steps, self.cfg)

    def _run(self, rows: list[tuple[Task, int, int]]) -> None:
        try:
            logits = run_batch(self.llm, [(t.pending, s, e) for t, s, e in rows])
        except Exception as exc:  # noqa: BLE001 - a failed forward fails its own tasks, never the loop
            for t, _, _ in rows:
                self._fail(t, exc)
            return
        for (t, _, end), out in zip(rows, logits):
            if end < t.pending.tokens:
                t.done = end  # chunked prefill: the rest goes in a later step
            else:
                self._advance(t, out)

    def _advance(self, task: Task, value: torch.Tensor | None) -> None:
        """Resume ``task``'s coroutine until it asks for its next forward (or ends)."""
        try:
            while True:
                item = task.work.send(value)
                if isinstance(item, Forward):
                    task.pending, task.done = item, 0
                    task.forwards += 1
                    return
                task.tokens.put(item)
                value = None
        except StopIteration:
            with self._cond:
                self._remove(task)
            task.finish_step = self.stats.steps
            task.finish()
        except Exception as exc:  # noqa: BLE001 - reported to this task's caller only
            self._fail(task, exc)

    def _fail(self, task: Task, exc: BaseException) -> None:
        task.work.close()
        with self._cond:
            self._remove(task)
        task.finish(exc)

    def queued(self, stream_id: str | None = None) -> int:
        """Tasks queued or running (of one stream, or all)."""
        with self._cond:
            if stream_id is not None:
                return len(self._queues.get(stream_id, []))
            return sum(len(q) for q in self._queues.values())

    def snapshot(self) -> SchedulerStats:
        """A copy of the counters."""
        return SchedulerStats(**vars(self.stats))


def pick_prefills(tasks: list[Task], step: int, cfg: SchedulerConfig) -> list[tuple[Task, int, int]]:
    """Rows of a step's prefill micro-batch: ``(task, start, end)`` token slices within ``cfg.token_budget``.

    Order: chunks waiting ``max_ingest_wait_steps`` or more (ageing), then questions if ``questions_first``, then
    arrival. A piece with family extras runs alone and whole; otherwise the last admitted piece may be
    cut (the rest of it goes next step).
    """

    def rank(t: Task) -> tuple[int, int, int]:
        aged = t.kind != "question" and step - t.arrival_step >= cfg.max_ingest_wait_steps
        question = t.kind == "question" and cfg.questions_first
        return (0 if aged else 1, 0 if question else 1, t.seq)

    rows: list[tuple[Task, int, int]] = []
    budget = cfg.token_budget
    for t in sorted(tasks, key=rank):
        if len(rows) == cfg.max_batch_rows or budget <= 0:
            break
        if t.pending.extra:
            if rows:
                continue
            return [(t, t.done, t.pending.tokens)]
        take = min(t.pending.tokens - t.done, budget)
        rows.append((t, t.done, t.done + take))
        budget -= take
    return rows


def token_stream(scheduler: Scheduler, task: Task):
    """Yield an answer task's token ids as the loop produces them; closing the generator cancels the task and
    returns once its scratch KV is rolled back (at most the step in progress later)."""
    finished = False
    try:
        while True:
            item = task.tokens.get()
            if item is _END:
                finished = True
                if task.error is not None:
                    raise task.error
                return
            yield item
    finally:
        if not finished:  # the client went away: free the scratch KV now (within the current step)
            scheduler.cancel(task)
            if threading.current_thread().name != LOOP_THREAD:  # never wait on ourselves (finalised by GC there)
                task.finished.wait()
