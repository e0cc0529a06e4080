"""fs/loop.py: owns how the FUSE main loop waits for the next request (pyfuse3's wait, made cheaper).

pyfuse3's worker tasks each run ``_session_loop``: wait until /dev/fuse is readable,
read one request, handle it, again. Its wait takes a ``trio.Lock`` (two checkpoints,
one of them a full pass of the scheduler even when nobody else wants it) and then
``trio.lowlevel.wait_readable`` (an epoll registration and another pass). For a
request that the handler answers at once, that bookkeeping was most of the daemon's
CPU: ≈ 55 µs per round trip on the reference passthrough, of which the handler a
few µs (docs/PERFORMANCE.md, "The FUSE loop").

``RequestWait`` replaces that wait (pyfuse3 calls it through its module global
``_wait_fuse_readable``, so ``install`` swaps it in):

- **One waiter at a time, without a lock's checkpoints.** A flag says a task is
  waiting on the fd; the others park on a LIFO stack and are woken one at a time
  when the waiter takes a request. pyfuse3 grows its pool towards ``max_tasks``
  (it no longer sees idle readers), and each worker's receive buffer keeps every
  page a request ever wrote into it (up to 1 MiB): so a worker new to this wait
  parks at the *bottom* while others are around (or woken and not yet run), and
  again at the bottom when it is woken and finds the place taken; LIFO keeps the
  same two or three workers busy. A new one is woken only when all before it are busy in
  handlers at once. After a burst of concurrent requests, a worker that holds a
  buffer and finds ``KEEP_IDLE`` such workers parked already ends (the wait returns
  False: pyfuse3 frees its buffer and starts a fresh worker when it needs one), so
  the daemon's memory comes back down after the burst.
- **A short spin before sleeping.** An application that issues one syscall after
  another (write, fsync, write...) sends its next request a few µs after the last
  reply. For up to ``SPIN_S`` the waiter polls the fd (``poll`` with a zero timeout)
  before it goes to epoll and the scheduler, and takes a request that arrives
  meanwhile at once. The event loop is held for at most ``SPIN_S`` per request.
- **Fairness.** A request taken without sleeping is taken without a scheduler pass,
  so the waiter yields (``trio.lowlevel.checkpoint``) at least every ``YIELD_EVERY_S``
  of such requests: other tasks (the shipper, status, worker threads' results) never
  wait longer than that behind a busy mount.
- **Termination.** pyfuse3's own wait checks the session's exit flag, which Python
  cannot read; ``terminate`` here sets ours before calling ``pyfuse3.terminate`` (which
  wakes the current waiter), and parked tasks find it when they wake. An unmount from
  outside makes the fd readable; each task then reads the end of the session and
  leaves, waking the next.

If pyfuse3 is not the version this was written against (no ``_wait_fuse_readable``
coroutine function), nothing is replaced and the stock loop runs.
"""

from __future__ import annotations

import inspect
import logging
import select
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)

# How long the waiter polls for the next request before it sleeps (see the module docstring).
SPIN_S = 30e-6
# How many workers that hold a receive buffer may wait parked; more end (pyfuse3 frees the buffer).
KEEP_IDLE = 2
# The longest run of requests taken without yielding to the other tasks.
YIELD_EVERY_S = 0.5e-3


class RequestWait:
    """The wait of pyfuse3's worker tasks for the next request on the session's fd ``fd``."""

    def __init__(self, fd: int, *, spin_s: float = SPIN_S, yield_every_s: float = YIELD_EVERY_S) -> None:
        self.fd = fd
        self.spin_s = spin_s
        self.yield_every_s = yield_every_s
        self.closed = False
        self.spun = 0  # requests taken while spinning
        self.slept = 0  # requests taken after sleeping in epoll
        self.retired = 0  # workers ended to free their receive buffers
        self._waiting = False  # a task holds the waiter's place
        self._parked: list[trio.lowlevel.Task] = []  # LIFO
        self._known: set[trio.lowlevel.Task] = set()  # workers that waited here before
        self._used: set[trio.lowlevel.Task] = set()  # workers that took a request (they hold a receive buffer)
        self._fresh_parked = 0  # parked workers not in _used: the bottom of the stack
        self._woken = 0  # parked workers woken that have not run yet (they will wait or park again)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._last_yield = time.perf_counter()

    async def __call__(self) -> bool:
        """Return True once a request can be read (by the caller, without blocking), False to stop."""
        task = trio.lowlevel.current_task()
        if task not in self._known:
            self._known.add(task)
            if self._waiting or self._parked or self._woken:  # a worker pyfuse3 just started: the last to be woken
                await self._park(bottom=True)
        while self._waiting:
            if task in self._used and len(self._parked) - self._fresh_parked >= KEEP_IDLE:
                # Enough workers with a buffer wait already (after a burst of concurrent requests):
                # this one ends, and pyfuse3 frees its buffer (it starts a fresh one when it needs one).
                self._known.discard(task)
                self._used.discard(task)
                self.retired += 1
                return False
            await self._park(bottom=task not in self._used)  # a fresh worker stays below those with a buffer
        if self.closed:
            self._wake_one()  # pass the news on
            return False
        self._waiting = True
        self._used.add(task)
        try:
            if self.spin_s and self._spin():
                self.spun += 1
                if time.perf_counter() - self._last_yield > self.yield_every_s:
                    await trio.lowlevel.checkpoint()
                    self._last_yield = time.perf_counter()
                return not self.closed
            await trio.lowlevel.wait_readable(self.fd)
            self._last_yield = time.perf_counter()
            self.slept += 1
        except trio.ClosedResourceError:  # terminate(): pyfuse3.terminate's notify_closing
            return False
        finally:
            self._waiting = False
            self._wake_one()
        return not self.closed

    def _spin(self) -> bool:
        poll, deadline = self._poller.poll, time.perf_counter() + self.spin_s
        while True:
            if poll(0):
                return True
            if time.perf_counter() > deadline:
                return False

    async def _park(self, *, bottom: bool = False) -> None:
        task = trio.lowlevel.current_task()
        if bottom:
            self._parked.insert(0, task)
            self._fresh_parked += 1
        else:
            self._parked.append(task)

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._parked.remove(task)
            if task not in self._used:
                self._fresh_parked -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        self._woken -= 1

    def _wake_one(self) -> None:
        if self._parked:
            task = self._parked.pop()
            if task not in self._used:
                self._fresh_parked -= 1
            self._woken += 1
            trio.lowlevel.reschedule(task)


_installed: RequestWait | None = None


def install(fd: int | None, **kw: float) -> RequestWait | None:
    """Make pyfuse3's worker tasks wait through a ``RequestWait`` on ``fd`` (None: leave pyfuse3's own)."""
    global _installed
    stock = getattr(pyfuse3, "_wait_fuse_readable", None)
    if fd is None or not inspect.iscoroutinefunction(stock):  # pyfuse3 3.5's Cython coroutine function passes
        log.info("pyfuse3 %s: the stock request loop is used", getattr(pyfuse3, "__version__", "?"))
        _installed = None
        return None
    _installed = RequestWait(fd, **kw)
    pyfuse3._wait_fuse_readable = _installed  # pyfuse3's _session_loop looks it up by name on every request
    return _installed


def statistics() -> dict[str, int] | None:
    """Requests taken while spinning and after sleeping, workers ended (status ``fuse_requests``); None with
    the stock loop."""
    if _installed is None:
        return None
    return {"taken_spinning": _installed.spun, "taken_after_sleep": _installed.slept,
            "workers_retired": _installed.retired}


def terminate() -> None:
    """End the main loop: our waiters first, then pyfuse3's session."""
    if _installed is not None:
        _installed.closed = True
    pyfuse3.terminate()
