"""Run rule-based verifiers in worker processes, with a hard time limit per call.

A verifier is ordinary Python: math-verify on `2^{2^{2^{2^{100}}}}` or a normaliser on a 10 MB answer can run
for seconds or forever, and a thread cannot be stopped. So each call goes to a worker process; when the
call is not answered within the time limit the worker is killed (and started again for the next call),
and the caller gets `VerifierTimeout`. Workers are started on first use, import the verifier modules
before they take work (so the limit measures the call, not the imports), and exit when their parent goes
away (the pipe closes).

`VerifierPool.run` is synchronous and thread-safe: each thread of the pool's own executor drives one
worker; `VerifierPool.submit` gives an awaitable for the calling event loop (any loop: `asyncio.run`
called several times is fine). `shared_pool(n)` is the process-wide pool of n workers that reward managers
use (started on first use, stopped at exit), so several managers in one process share their workers.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import threading
import weakref
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Imported by a worker before it reports ready (missing ones are skipped); math_verify (sympy) takes
# seconds, so a reward manager adds it only when the math verifier is in use.
WARM_MODULES = ("megatron_minio3.rewards.verifiers",)
_START_TIMEOUT_S = 120.0


class VerifierTimeout(Exception):
    """The call did not finish within the time limit; its worker was killed."""


class VerifierWorkerDied(Exception):
    """The worker process ended during the call (killed for memory, a crash in native code)."""


class VerifierRaised(RuntimeError):
    """The verifier raised in the worker; the message is its exception as "Type: message"."""


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its parent dies, even in the middle of a long call."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the worker exits when the pipe closes, after the call in progress


def _worker_main(conn: multiprocessing.connection.Connection, warm_modules: tuple[str, ...]) -> None:
    _die_with_parent()
    for name in warm_modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    conn.send(("ready", None))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe or went away
            return
        try:
            reply = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller, the worker lives on
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send(("error", f"the verifier's result cannot be sent back: {exc}"))


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: multiprocessing.context.BaseContext, warm_modules: tuple[str, ...]):
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(child, warm_modules), daemon=True, name="minio3-verifier"
        )
        self.process.start()
        child.close()
        if not self.conn.poll(_START_TIMEOUT_S):
            self.kill()
            raise RuntimeError(f"a verifier worker did not start within {_START_TIMEOUT_S:.0f} s")
        self.conn.recv()

    def call(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> Any:
        try:
            self.conn.send((fn, args))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.process.join(timeout=5)
            raise VerifierWorkerDied(f"the verifier worker died (exit code {self.process.exitcode})") from None
        try:
            ready = self.conn.poll(timeout_s)
        except (EOFError, OSError):
            ready = True  # recv below reports the dead worker
        if not ready:
            self.kill()
            raise VerifierTimeout(f"no verdict within {timeout_s:g} s")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            raise VerifierWorkerDied(f"the verifier worker died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise VerifierRaised(value)
        return value

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()

    def close(self) -> None:
        self.conn.close()  # the worker sees EOF and returns
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class VerifierPool:
    """`num_workers` worker processes; a call past its time limit is killed with its worker."""

    def __init__(self, num_workers: int, *, start_method: str | None = None,
                 warm_modules: tuple[str, ...] = WARM_MODULES):
        if num_workers < 1:
            raise ValueError(f"VerifierPool needs num_workers >= 1, got {num_workers}")
        self.num_workers = num_workers
        if start_method is None:
            # forkserver: workers are forked from one clean process that imported the verifier modules once,
            # so a worker (and its replacement after a timeout) starts in milliseconds; never a fork of this
            # process, which may hold threads (Ray, vLLM) and their locks.
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # only takes effect if this process's fork server is not running yet (then it is only slower)
            self._context.set_forkserver_preload(list(warm_modules))
        self._warm_modules = warm_modules
        self._executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="minio3-verifier")
        self._local = threading.local()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        _live_pools.add(self)

    def run(self, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in this thread's worker, killed after `timeout_s` seconds. Raises VerifierTimeout,
        VerifierWorkerDied, or VerifierRaised carrying the verifier's own exception as text."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        worker: _Worker | None = getattr(self._local, "worker", None)
        if worker is None or not worker.alive:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the verifier pool is closed")
            worker = _Worker(self._context, self._warm_modules)
            with self._lock:
                self._workers = [w for w in self._workers if w.alive] + [worker]
            self._local.worker = worker
        try:
            return worker.call(fn, args, timeout_s)
        except (VerifierTimeout, VerifierWorkerDied):
            self._local.worker = None
            raise

    def submit(self, timeout_s: float, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """`run` on one of the pool's threads, as a future of the running event loop."""
        return asyncio.wrap_future(self._executor.submit(self.run, timeout_s, fn, *args))

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers, self._workers = self._workers, []
        self._executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.close()
        _live_pools.discard(self)


def can_send(fn: Callable[..., Any]) -> bool:
    """Whether `fn` can be sent to a worker: a module-level function (pickled by reference)."""
    try:
        pickle.dumps(fn)
    except Exception:  # noqa: BLE001 - lambdas, closures, bound methods of unpicklable objects
        return False
    return True


_live_pools: weakref.WeakSet[VerifierPool] = weakref.WeakSet()
_shared: dict[tuple[int, tuple[str, ...]], VerifierPool] = {}
_shared_lock = threading.Lock()


def shared_pool(num_workers: int, warm_modules: tuple[str, ...] = WARM_MODULES) -> VerifierPool:
    """The process-wide pool with `num_workers` workers warming `warm_modules` (created on first use, closed
    at exit): reward managers of one process share their workers."""
    key = (num_workers, tuple(warm_modules))
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None or pool._closed:
            pool = _shared[key] = VerifierPool(num_workers, warm_modules=key[1])
        return pool


@atexit.register
def _close_live_pools() -> None:
    for pool in list(_live_pools):
        pool.close()
