"""Each engine in its own process: a fresh interpreter per engine (`python -P -m isthmus.bench.isolated`),
so no OpenMP, BLAS or Numba state passes from one engine to another, each with its own settings.

    with Worker("isthmus.bench.model:LlamaCppEngine", path) as llama:     # built once, in the worker
        seconds = llama.call("prefill", ids)                                 # timed inside the worker

A worker's environment is this process's without the OpenMP runtime's settings (OMP_*, GOMP_*, KMP_*,
which libgomp reads for llama.cpp and numba alike), plus what the engine asks for itself (nothing, for
every engine `isthmus bench` runs): each engine runs with its own defaults, llama.cpp's threads
spinning as it intends. Calls are pickled over the worker's stdin/stdout; what the engine prints goes
to a log file whose tail a failure quotes. `interleave` runs the engines one at a time, in turns
(round 1: A then B; round 2: B then A; ...), pausing between engines, so that load on a shared machine
falls on every engine alike and the best of the rounds is each engine's least disturbed figure.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback

# The OpenMP runtimes' environment (libgomp, LLVM's libomp, Intel's): an engine gets its own defaults.
OPENMP_PREFIXES = ("OMP_", "GOMP_", "KMP_")

# Seconds between one engine's last call and the next engine's first. After a call, an idle worker's
# OpenMP threads (llama.cpp's, numba's) spin for libgomp's default spin count: measured here, 6-11 ms
# of CPU within the first 20 ms, none after 50 ms (docs/performance.md); this leaves a wide margin.
PAUSE = 0.2


def engine_env(extra: dict | None = None) -> dict:
    """This process's environment without the OpenMP runtime settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OPENMP_PREFIXES)}
    env.update(extra or {})
    return env


class WorkerError(RuntimeError):
    """An engine failed inside its worker (the message ends with the worker's traceback)."""


class Worker:
    """One engine, `factory(*args, **kwargs)` ("module:callable"), built in a new interpreter.
    `call(method, ...)` runs one of its methods there and returns the result. An ImportError in
    the worker (a peer not installed) is raised here as ImportError."""

    def __init__(self, factory: str, *args, env: dict | None = None, **kwargs):
        self.factory = factory
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "isthmus.bench.isolated"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=engine_env(env))
        try:
            self.pid = self._send(("__build__", (factory, args, kwargs), {}))
        except BaseException:
            self.close()
            raise

    def call(self, method: str, *args, **kwargs):
        return self._send((method, args, kwargs))

    def info(self) -> dict:
        """{"pid", "env", "modules"} as the worker sees them (modules: the names imported there)."""
        return self._send(("__info__", (), {}))

    def _send(self, msg):
        try:
            pickle.dump(msg, self.proc.stdin)
            self.proc.stdin.flush()
            status, value = pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError, pickle.UnpicklingError):
            self.proc.wait()
            raise WorkerError(f"{self.factory} worker exited (status {self.proc.returncode}): "
                              f"{self._log_tail() or 'no output'}") from None
        if status == "ok":
            return value
        kind, message, tb = value
        if kind in ("ImportError", "ModuleNotFoundError"):
            raise ImportError(message)
        raise WorkerError(f"{self.factory}: {kind}: {message}\n{tb}")

    def _log_tail(self, n: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()         # the worker's loop ends at EOF
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def interleave(workers: dict, step, rounds: int, pause: float = PAUSE) -> dict:
    """{name: [step(name, worker) for each round]}: in round r the engines run in `workers`' order,
    reversed every other round, one at a time, `pause` seconds apart."""
    out = {name: [] for name in workers}
    names = list(workers)
    for r in range(rounds):
        for i, name in enumerate(names if r % 2 == 0 else names[::-1]):
            if i or r:
                time.sleep(pause)
            out[name].append(step(name, workers[name]))
    return out


def _serve() -> None:
    """The worker's loop: build the engine, then answer calls until stdin closes."""
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                       # whatever the engine prints goes to the log, not the pipe
    sys.stdout = sys.stderr
    engine = None
    while True:
        try:
            method, args, kwargs = pickle.load(inp)
        except EOFError:
            break
        try:
            if method == "__build__":
                factory, fargs, fkwargs = args
                module, name = factory.split(":")
                engine = getattr(importlib.import_module(module), name)(*fargs, **fkwargs)
                reply = ("ok", os.getpid())
            elif method == "__info__":
                reply = ("ok", {"pid": os.getpid(), "env": dict(os.environ), "modules": sorted(sys.modules)})
            else:
                reply = ("ok", getattr(engine, method)(*args, **kwargs))
        except Exception as e:
            reply = ("error", (type(e).__name__, str(e), traceback.format_exc()))
        pickle.dump(reply, out)
        out.flush()
    if engine is not None and hasattr(engine, "close"):
        engine.close()


if __name__ == "__main__":
    _serve()
