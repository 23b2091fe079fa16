"""One timer thread for every pool: mayday timers, idle timers, delayed works, watchdog ticks.

The kernel's ``timer_list`` in a userspace shape: a heap of deadlines served by a single daemon
thread that sleeps until the next one. Callbacks run on that thread, must be short and must not
block (they take a pool lock, queue a work, wake a worker).

The same thread serves one watched socket (:func:`watch`: the hotplug monitor's uevent socket), so
that needs no thread of its own: while a socket is watched the thread sleeps in ``select`` on it
and on a wake-up pipe, with the next deadline as timeout, and a timer that becomes the earliest
writes a byte to the pipe.

Every pool depends on that one thread, so nothing may end it but :func:`shutdown`:

* delays are clamped to ``[0, MAX_DELAY]`` when a timer is added (a deadline beyond what
  ``Condition.wait`` accepts used to kill the thread with OverflowError); NaN is refused in the
  caller. Public entry points check their users' delays first with :func:`check_delay`;
* whatever a callback raises, BaseException included, is logged and the thread goes on; so does a
  failure of the loop itself;
* if the thread is dead anyway, the next :func:`add_timer` starts a new one;
* it never sleeps past the earliest timer: a timer that becomes the earliest wakes it, and the
  wakeup comes before the timer is pushed, so an exception landing in :func:`add_timer` (a Ctrl-C,
  a Celery time limit on a task's thread) cannot leave a timer in the heap with the thread asleep
  past it (``_Wheel.check_invariants``, which the interruption tests run after every injection);
* in a child process, the wheel starts afresh (new lock, no timers, no thread) at fork.

A cancelled timer costs nothing but its small ``Timer`` object: ``cancel()`` drops the callback (a
bound method or partial holding a job, a work, a workqueue), and a fired timer drops it too once
taken. Its heap entry stays until the thread pops it or the heap is rebuilt without the cancelled
entries, which :meth:`_Wheel.compact_locked` does once they are more than half of the heap and
more than ``_COMPACT_MIN_CANCELLED`` (asyncio's event loop does the same for ``call_later``): a
process that arms an hour's timer per task and cancels it when the task ends keeps a heap as long
as its live timers, and add and cancel stay O(log n) amortised.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from .lockdep import make_lock, must_hold

log = logging.getLogger("cmwq_exec.timer")

#: The longest delay a timer can have: a year, as good as never for a process. Longer delays are
#: clamped to it. (``Condition.wait`` refuses timeouts beyond ``threading.TIMEOUT_MAX``.)
MAX_DELAY = min(365 * 24 * 3600.0, threading.TIMEOUT_MAX)
#: After the loop itself failed (it should not), pause this long before going on.
_LOOP_FAILURE_PAUSE = 0.01
#: Rebuild the heap once it holds more cancelled entries than this and than live ones. Arbitrary,
#: as asyncio's ``_MIN_SCHEDULED_TIMER_HANDLES`` is: small heaps are not worth the rebuild.
_COMPACT_MIN_CANCELLED = 100


def check_delay(where: str, delay: object) -> float:
    """``delay`` as a float of seconds in ``[0, MAX_DELAY]``: a delay a user gave a public call.

    Raises ValueError naming the argument (``where``, e.g. ``"queue_delayed_work(work, delay):
    delay"``) for what is not a finite int or float >= 0: other types, bools, NaN, infinities,
    negative numbers. Finite delays longer than :data:`MAX_DELAY` are clamped to it.
    """
    if (isinstance(delay, bool) or not isinstance(delay, (int, float))
            or not 0 <= delay < float("inf")):  # NaN fails the comparison too
        raise ValueError(f"{where} must be a finite number of seconds >= 0, got {delay!r}")
    if delay >= MAX_DELAY:
        return MAX_DELAY
    return float(delay)


class Timer:
    """A pending callback. ``cancel()`` returns True if it had not fired (and now never will)."""

    __slots__ = ("deadline", "callback", "state", "wheel")

    def __init__(self, deadline: float, callback: Callable[[], None], wheel: _Wheel) -> None:
        self.deadline = deadline  # I
        # L: the wheel's lock; None once fired or cancelled, so that neither a cancelled entry
        # waiting in the heap nor a Timer its owner keeps holds the callback's objects
        self.callback: Callable[[], None] | None = callback
        self.state = 0  # 0 pending, 1 fired, 2 cancelled; L: the wheel's lock
        self.wheel = wheel  # I

    def cancel(self) -> bool:
        wheel = self.wheel
        with wheel.lock:
            if self.state != 0:
                return False
            self.state = 2
            self.callback = None
            wheel.cancelled += 1
            wheel.compact_locked()
            return True

    @property
    def pending(self) -> bool:
        return self.state == 0


class _Wheel:
    """The heap and the thread serving it.

    A thread serves the heap only while it is ``thread``: :meth:`shutdown` (or a restart after the
    thread died) replaces it, and a replaced thread exits at its next look at the heap, so at most
    one thread ever pops timers.
    """

    def __init__(self) -> None:
        # ``with self.lock``, never ``with self.cond``: add() and cancel() run on task threads too
        # (blocking() hands a running slot on through add_timer), where a Celery time limit may
        # inject an exception at any call's return, and Condition.__enter__ is a Python function:
        # an exception raised as it returns would leave the lock held. A plain lock's __enter__
        # is C, so the with block owns the lock from the instruction it is taken in.
        self.lock = make_lock("timer")
        self.cond = threading.Condition(self.lock)  # the timer thread waits on it, under lock
        self.clock: Callable[[], float] = time.monotonic  # I; a test may give a wheel its own
        self.heap: list[tuple[float, int, Timer]] = []  # L: lock
        # L: lock; cancels since the heap was last rebuilt, popped ones taken off: never fewer than
        # the cancelled entries in the heap (a timer shutdown dropped counts too when cancelled,
        # which can only bring a rebuild forward)
        self.cancelled = 0
        self.seq = itertools.count()  # L: lock
        self.thread: threading.Thread | None = None  # L: lock; the thread serving the heap
        self.watched: tuple[Any, Callable[[], None]] | None = None  # L: lock; (socket, on_ready)
        self.selecting = False  # L: lock; the thread is (about to be) in select: poke to wake it
        # L: lock; the deadline the thread sleeps until (inf: none), None while it is awake or a
        # wakeup is on its way to it. Invariant: never later than the heap's head (check_invariants)
        self.sleep_until: float | None = None
        self.wake_r: int | None = None  # L: lock; the wake-up pipe, made by the first watch()
        self.wake_w: int | None = None

    def add(self, delay: float, callback: Callable[[], None]) -> Timer:
        if delay != delay:
            raise ValueError(f"add_timer(delay, callback): delay is NaN (callback {callback!r})")
        delay = min(max(delay, 0.0), MAX_DELAY)
        timer = Timer(self.clock() + delay, callback, self)
        with self.lock:
            self.start_locked()  # first: a timer is queued only if a thread will serve it
            entry = (timer.deadline, next(self.seq), timer)
            heap = self.heap
            if not heap or timer.deadline < heap[0][0]:
                # The wakeup before the push (calls first, stores after: core/interrupts.py): the
                # thread looks at the heap only once this lock is released, so it finds the entry,
                # and an exception landing as heappush returns comes after both. Pushed first, an
                # exception landing there skipped the wakeup, and the thread slept past its head.
                self.cond.notify()
                self.poke_locked()
                self.sleep_until = None
            heapq.heappush(heap, entry)
        return timer

    @must_hold("lock")
    def check_invariants(self) -> None:
        """The thread is never asleep past the heap's head: a timer that became the earliest woke
        it (or is waking it). L: held."""
        heap = self.heap
        assert self.sleep_until is None or not heap or self.sleep_until <= heap[0][0], \
            (self.sleep_until, heap[0][0])

    @must_hold("lock")
    def compact_locked(self) -> None:
        """Once cancelled entries are more than half of the heap (and more than
        _COMPACT_MIN_CANCELLED), rebuild it with the live ones only; called after a cancel and after
        a live timer left the heap, so that the cancelled entries never outnumber the live ones
        beyond that minimum. A rebuild costs O(len) < O(2 * cancelled), each cancel is counted by
        one rebuild at most: O(1) amortised per cancel. L: held.

        The new heap is complete before it replaces the old one in one step (a slice assignment,
        C code): an exception injected into a task thread that cancels leaves one or the other."""
        heap = self.heap
        if self.cancelled <= _COMPACT_MIN_CANCELLED or 2 * self.cancelled <= len(heap):
            return
        live = [entry for entry in heap if entry[2].state != 2]
        heapq.heapify(live)
        heap[:] = live
        self.cancelled = 0

    @must_hold("lock")
    def poke_locked(self) -> None:
        """Wake the thread out of select, if it is there. L: held."""
        if self.selecting and self.wake_w is not None:
            try:
                os.write(self.wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the thread will wake anyway

    def watch(self, sock: Any, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready()`` on the timer thread whenever ``sock`` is readable (one socket at a
        time: a second call replaces the first). RuntimeError if no timer thread can be started."""
        with self.lock:
            self.start_locked()
            if self.wake_r is None:
                self.wake_r, self.wake_w = os.pipe()
                os.set_blocking(self.wake_r, False)
                os.set_blocking(self.wake_w, False)
            self.watched = (sock, on_ready)
            self.cond.notify()
            self.poke_locked()

    def unwatch(self, sock: Any) -> None:
        """Stop watching ``sock`` (before closing it)."""
        with self.lock:
            if self.watched is not None and self.watched[0] is sock:
                self.watched = None
                self.poke_locked()

    @must_hold("lock")
    def start_locked(self) -> None:
        """Make sure a thread serves the heap; RuntimeError if none can be started. L: held."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            return
        if thread is not None and thread.ident is not None:
            log.error("cmwq_exec timer thread %r had died; starting a new one", thread)
        thread = threading.Thread(target=self.run, name="cmwq-timer", daemon=True)
        thread.start()
        self.thread = thread

    def run(self) -> None:
        """The timer thread: serve the heap until this thread is no longer the wheel's."""
        me = threading.current_thread()
        while True:
            try:
                if not self.run_next(me):
                    return
            except BaseException:
                try:
                    log.exception("cmwq_exec timer thread: its loop failed; going on")
                    time.sleep(_LOOP_FAILURE_PAUSE)
                except BaseException:
                    pass

    def run_next(self, me: threading.Thread) -> bool:
        """Wait for the next due timer and call it, or for the watched socket and serve it.
        Returns False once ``me`` has been replaced."""
        timer: Timer | None
        with self.lock:
            while True:
                if self.thread is not me:
                    return False
                heap = self.heap
                while heap and heap[0][2].state == 2:
                    heapq.heappop(heap)
                    if self.cancelled:
                        self.cancelled -= 1
                now = self.clock()
                if heap and heap[0][0] <= now:
                    timer = heapq.heappop(heap)[2]
                    timer.state = 1
                    callback, timer.callback = timer.callback, None
                    self.compact_locked()
                    break
                timeout = min(heap[0][0] - now, MAX_DELAY) if heap else None
                watched = self.watched
                self.sleep_until = heap[0][0] if heap else float("inf")
                if watched is None:
                    self.cond.wait(timeout)
                    self.sleep_until = None
                    continue
                self.selecting = True  # from here on, add() pokes the pipe
                wake_r = self.wake_r
                timer = None
                break
        if timer is None:
            assert watched is not None
            self.select_once(watched, wake_r, timeout)
            return True
        assert callback is not None  # a pending timer has its callback
        try:
            callback()
        except BaseException:
            log.exception("cmwq_exec timer callback %r raised", callback)
        return True

    def select_once(self, watched: tuple[Any, Callable[[], None]], wake_r: int | None,
                    timeout: float | None) -> None:
        """Sleep until the watched socket is readable, a poke, or ``timeout``; serve the socket."""
        sock, on_ready = watched
        ready: list[Any] = []
        try:
            ready, _, _ = select.select([sock, wake_r], [], [], timeout)
        except (OSError, ValueError) as exc:  # the socket was closed without unwatch()
            log.warning("cmwq_exec timer thread: watched socket %r failed (%s); no longer watched",
                        sock, exc)
            with self.lock:
                if self.watched is watched:
                    self.watched = None
        finally:
            with self.lock:
                self.selecting = False
                self.sleep_until = None
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)  # type: ignore[arg-type]
            except OSError:
                pass
        if sock in ready:
            with self.lock:
                current = self.watched is watched
            if current:
                try:
                    on_ready()
                except BaseException:
                    log.exception("cmwq_exec timer thread: socket callback %r raised", on_ready)

    def shutdown(self, timeout: float | None = 5.0) -> bool:
        """Stop the thread and drop the pending timers; True if the thread ended within ``timeout``.

        Dropped timers never fire but stay pending: their owners can still ``cancel()`` them and
        get True. The next :meth:`add` starts a fresh thread. From a callback (the thread itself)
        this cannot wait: the thread ends when the callback returns, and False is returned.
        """
        with self.lock:
            thread, self.thread = self.thread, None
            self.heap.clear()
            self.cancelled = 0
            self.watched = None
            self.cond.notify_all()
            self.poke_locked()
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        return not thread.is_alive()

    def after_fork(self) -> None:
        """In a child: the parent's thread is gone and its lock may have been held at fork."""
        self.lock = make_lock("timer")
        self.cond = threading.Condition(self.lock)
        self.heap = []
        self.cancelled = 0
        self.thread = None
        self.watched = None
        self.selecting = False
        for fd in (self.wake_r, self.wake_w):  # shared with the parent: a child's poke would wake it
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.wake_r = self.wake_w = None


_wheel = _Wheel()
os.register_at_fork(after_in_child=_wheel.after_fork)


def add_timer(delay: float, callback: Callable[[], None]) -> Timer:
    """Call ``callback`` on the timer thread after ``delay`` seconds.

    ``delay`` is clamped to ``[0, MAX_DELAY]``; NaN raises ValueError here, in the caller.
    """
    return _wheel.add(delay, callback)


def watch(sock: Any, on_ready: Callable[[], None]) -> None:
    """Call ``on_ready()`` on the timer thread whenever ``sock`` is readable (one socket per
    process; RuntimeError if the timer thread cannot be started)."""
    _wheel.watch(sock, on_ready)


def unwatch(sock: Any) -> None:
    """Stop watching ``sock``; call it before closing the socket."""
    _wheel.unwatch(sock)


def start() -> None:
    """Start the process's timer thread now if it is not running (RuntimeError if it cannot be)."""
    with _wheel.lock:
        _wheel.start_locked()


def shutdown(timeout: float | None = 5.0) -> bool:
    """Stop the process's timer thread, dropping every pending timer; wait up to ``timeout``
    seconds for it to end and return whether it did. The next :func:`add_timer` starts a new one."""
    return _wheel.shutdown(timeout)
