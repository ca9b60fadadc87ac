"""Worker processes that train runs for the local runner, and the messages between them.

Each worker is a fresh interpreter (the 'spawn' start method: nothing of the parent's JAX state,
threads or locks is inherited) that starts JAX with its run's XLA:CPU thread count (see
batchlab.runner.resources), points the persistent compilation cache at the runner's folder for
that count, and then trains one run at a time for as long as the pool lives. Requests and
results cross the pipe as JSON text (``Connection.send_bytes``), never pickles; only the parent
writes the results folder.

A worker that dies mid-run (killed, out of memory, a crash in native code) gives that run a
FAILED attempt, which the study protocol retries. The parent being interrupted (Ctrl-C) or
dying ends the workers without recording anything: the runs they held were never stored, so a
rerun of the same command starts them again.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from batchlab.search.protocol import RunKind, RunRequest

__all__ = ["WorkerError", "WorkerPool", "cache_root_of", "function_reference", "request_from_payload",
           "request_payload", "resolve_function"]

log = logging.getLogger(__name__)

# How often a worker checks that its parent is alive (a parent killed with SIGKILL closes
# nothing a worker in the middle of a run would notice).
_PARENT_POLL_S = 0.5
_STOP_TIMEOUT_S = 5.0


class WorkerError(RuntimeError):
    """A worker could not start, or raised outside training (not a run outcome)."""


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def request_payload(request: RunRequest) -> dict[str, Any]:
    """Every field of a RunRequest as JSON data (the kind by its value)."""
    payload = {f.name: _plain(getattr(request, f.name)) for f in dataclasses.fields(request)}
    payload["kind"] = str(request.kind)
    return payload


def request_from_payload(payload: Mapping[str, Any]) -> RunRequest:
    """The RunRequest :func:`request_payload` wrote."""
    fields = {f.name for f in dataclasses.fields(RunRequest)}
    values = {k: v for k, v in payload.items() if k in fields}
    values["kind"] = RunKind(payload["kind"])
    return RunRequest(**values)


def function_reference(fn: Callable[..., Any]) -> str:
    """"module:qualname" of a module-level function, which a fresh interpreter can import.

    Raises:
      ValueError: ``fn`` is a lambda, a closure or otherwise not reachable by that name.
    """
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in name or module == "__main__":
        raise ValueError(f"train_fn: {fn!r} must be a module-level function of an importable module "
                         "to run in worker processes (or run in_process)")
    if resolve_function(f"{module}:{name}") is not fn:
        raise ValueError(f"train_fn: {module}:{name} does not name {fn!r}")
    return f"{module}:{name}"


def resolve_function(reference: str) -> Callable[..., Any]:
    """The function a :func:`function_reference` names."""
    module, _, name = reference.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    function: Callable[..., Any] = target
    return function


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(3)  # nothing to clean up: a worker writes no results itself

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _send(conn: Connection, message: Mapping[str, Any]) -> None:
    # allow_nan: a diverged run's curve holds NaN, and the results folder stores it as such.
    conn.send_bytes(json.dumps(message, allow_nan=True).encode())


def _worker_main(conn: Connection, threads: int, spec_json: str, data_dir: str | None,
                 train_ref: str, train_kwargs_json: str, cache_root: str | None, log_level: int,
                 parent_pid: int) -> None:
    """A worker's life: start JAX with ``threads`` threads, then train requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt ends
    _exit_with_parent(parent_pid)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s worker {os.getpid()} %(name)s: %(message)s")
    try:
        from batchlab.runner.resources import start_jax_with_threads
        from batchlab.search import expand_studies, load_spec
        from batchlab.train.compilation_cache import enable_compilation_cache

        start_jax_with_threads(threads)
        enable_compilation_cache(cache_root, cpu_threads=threads)
        studies = {s.id: s for s in expand_studies(load_spec(json.loads(spec_json),
                                                             validate_optimizers=False))}
        train = functools.partial(resolve_function(train_ref), **json.loads(train_kwargs_json))
    except Exception as err:  # noqa: BLE001 - any start-up failure is reported to the parent
        _send(conn, {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        return
    _send(conn, {"ready": os.getpid()})
    while True:
        try:
            message = json.loads(conn.recv_bytes())
        except EOFError:
            return
        if message.get("stop"):
            return
        request = request_from_payload(message["request"])
        try:
            result = train(request, studies[request.study_id], data_dir)
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            _send(conn, {"exception": type(err).__name__, "message": str(err),
                         "traceback": traceback.format_exc()})
        else:
            _send(conn, {"result": result})


def _crash_result(exitcode: int | None) -> dict[str, Any]:
    return {"outcome": "FAILED", "steps_completed": 0, "curve": [], "final_metrics": {},
            "steps_to_target": None, "error": f"worker process exited with code {exitcode} during the run"}


@dataclasses.dataclass(eq=False)
class _Worker:
    process: Any
    conn: Connection
    threads: int
    ready: bool = False
    request: RunRequest | None = None


class WorkerPool:
    """Up to ``size`` worker processes, each training one run at a time.

    Args:
      size: the most workers alive at once (the runner's P).
      spec: the experiment spec as its JSON mapping (workers rebuild the studies from it).
      train_ref: "module:qualname" of the train function, called as
        ``fn(request, study, data_dir, **train_kwargs) -> dict`` (a RunResult dict) in the worker.
      train_kwargs: JSON-able keyword arguments of the train function.
      data_dir: tfds data folder (None: the default folder).
      cache_root: the persistent compilation cache's root (None: batchlab's default); workers
        use its ``xla_cpu_threads_<T>`` subfolder.

    Example:
      >>> with WorkerPool(2, spec, "batchlab.runner.local:_train") as pool:  # doctest: +SKIP
      ...     pool.submit(request, threads=1)
      ...     [(request, result)] = pool.wait()
    """

    def __init__(self, size: int, spec: Mapping[str, Any], train_ref: str, *,
                 train_kwargs: Mapping[str, Any] | None = None, data_dir: str | None = None,
                 cache_root: str | None = None):
        if size < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        self.size = size
        self._spec_json = json.dumps(_plain(spec))
        self._train_ref = train_ref
        self._train_kwargs_json = json.dumps(_plain(train_kwargs or {}))
        self._data_dir = None if data_dir is None else str(data_dir)
        self._cache_root = cache_root
        self._context = mp.get_context("spawn")
        self._workers: list[_Worker] = []

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, threads: int) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, name=f"batchlab-worker-{len(self._workers)}", daemon=True,
            args=(child_conn, threads, self._spec_json, self._data_dir, self._train_ref,
                  self._train_kwargs_json, self._cache_root,
                  logging.getLogger().getEffectiveLevel(), os.getpid()),
        )
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn, threads)
        self._workers.append(worker)
        log.info("started worker pid %d with %d XLA:CPU thread(s)", process.pid, threads)
        return worker

    def _stop(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        try:
            _send(worker.conn, {"stop": True})
        except OSError:  # already gone
            pass
        worker.process.join(_STOP_TIMEOUT_S)
        if worker.process.is_alive():
            worker.process.terminate()
            worker.process.join(_STOP_TIMEOUT_S)
        worker.conn.close()

    def close(self) -> None:
        """End every worker; runs in flight are dropped (never recorded)."""
        for worker in list(self._workers):
            if worker.request is not None and worker.process.is_alive():
                worker.process.terminate()  # mid-run: a stop message would wait for the run
            self._stop(worker)

    # -- work ------------------------------------------------------------------------------
    def submit(self, request: RunRequest, *, threads: int) -> None:
        """Start ``request`` on an idle worker with ``threads`` threads (starting one if needed).

        Raises:
          RuntimeError: ``size`` runs are in flight already.
        """
        for dead in [w for w in self._workers if w.request is None and not w.process.is_alive()]:
            log.warning("idle worker pid %d exited with code %s; replacing it", dead.process.pid,
                        dead.process.exitcode)
            self._workers.remove(dead)
            dead.conn.close()
        idle = [w for w in self._workers if w.request is None]
        worker = next((w for w in idle if w.threads == threads), None)
        if worker is None:
            if len(self._workers) >= self.size:
                if not idle:
                    raise RuntimeError(f"all {self.size} workers are busy")
                self._stop(idle[0])  # a worker's thread count is fixed: replace it
            worker = self._start(threads)
        _send(worker.conn, {"request": request_payload(request)})
        worker.request = request

    def wait(self, timeout: float | None = None) -> list[tuple[RunRequest, dict[str, Any]]]:
        """Wait until at least one run ends (or ``timeout`` seconds); return the ended runs.

        Raises:
          WorkerError: a worker failed to start, or its train function raised.
          ValueError: the train function raised ValueError (an invalid run configuration).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ended: list[tuple[RunRequest, dict[str, Any]]] = []
        while not ended:
            busy = {w.conn: w for w in self._workers if w.request is not None}
            if not busy:
                break
            sentinels = {w.process.sentinel: w for w in busy.values()}
            # Keyed by what wait() hands back: a worker's pipe or its process sentinel.
            waiting: dict[Any, _Worker] = {**busy, **sentinels}
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            for ready in wait([*busy, *sentinels], left):
                worker = waiting[ready]
                if worker.request is None or worker not in self._workers:
                    continue  # both its pipe and its sentinel were ready
                request = worker.request
                result = self._receive(worker)
                if result is not None:
                    ended.append((request, result))
                    worker.request = None
            if deadline is not None and time.monotonic() >= deadline:
                break
        return ended

    def _receive(self, worker: _Worker) -> dict[str, Any] | None:
        """The result of the worker's run, or None when it only said it is ready."""
        try:
            if not worker.conn.poll():
                if worker.process.is_alive():
                    return None  # woken by the pipe of another worker's message
                raise EOFError
            message = json.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            # The pipe closed: the process is ending (or ended) without a result.
            worker.process.join(_STOP_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(_STOP_TIMEOUT_S)
            exitcode = worker.process.exitcode
            self._workers.remove(worker)
            worker.conn.close()
            if not worker.ready:
                raise WorkerError(
                    f"a worker exited with code {exitcode} before it was ready (its log is above; "
                    "a script that calls run_experiment needs `if __name__ == '__main__':`, as "
                    "for any process started with 'spawn')") from None
            log.warning("worker pid %d died during %s (exit code %s)", worker.process.pid,
                        worker.request.name if worker.request else "?", exitcode)
            return _crash_result(exitcode)
        if "ready" in message:
            worker.ready = True
            return None
        if "error" in message:
            raise WorkerError(f"a worker could not start: {message['error']}\n{message['traceback']}")
        if "exception" in message:
            name = worker.request.name if worker.request else "?"
            text = f"{name}: {message['exception']}: {message['message']}"
            if message["exception"] == "ValueError":
                raise ValueError(text)
            raise WorkerError(f"{text}\n{message['traceback']}")
        result: dict[str, Any] = message["result"]
        return result


_THREADS_SUBFOLDER = re.compile(r"xla_cpu_threads_\d+")


def cache_root_of(configured: str | os.PathLike[str] | None) -> str | None:
    """The root to hand workers for a cache folder this process configured (its per-thread
    subfolder stripped), or None when none is configured."""
    if not configured:
        return None
    path = Path(configured)
    return str(path.parent if _THREADS_SUBFOLDER.fullmatch(path.name) else path)
