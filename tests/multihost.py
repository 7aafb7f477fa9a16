"""Runs a function on N real JAX processes on this machine, for tests.

:func:`launch` starts ``n`` Python processes, each one
``jax.distributed.initialize(coordinator_address="127.0.0.1:<port>",
num_processes=n, process_id=i)`` with JAX's CPU collectives on gloo, one CPU
device each; each imports ``target`` (``"module:function"``, the module found
on ``sys.path`` of the tests folder) and calls it with ``kwargs``. What
process 0's call returns (a picklable value: NumPy arrays, dicts, numbers,
strings) comes back, pickled through a file in a temporary folder.

Cleanup: every process is ended in a ``finally`` (killed if still running
when the launch times out or fails); the coordinator's port is found by
binding ``127.0.0.1:0`` and is only ever opened on the loopback address.

Run as a script, this module is the worker: ``python multihost.py <port>
<n> <i> <target> <folder>``, the keyword arguments in ``<folder>/kwargs.pkl``.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import socket
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
NO_GLOO = 3  # a worker's exit status when gloo collectives are unavailable
_TAIL = 3000


class Unavailable(RuntimeError):
  """The machine cannot run JAX processes with gloo CPU collectives."""


class LaunchError(RuntimeError):
  """A process failed or the launch ran out of time; says which and why."""


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (bound to port 0, then released)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: pathlib.Path) -> str:
  try:
    return path.read_text(errors="replace")[-_TAIL:]
  except OSError:
    return "<no output>"


def launch(target: str, n: int, *, timeout: float = 120.0,
           cache_dir: str | None = None, **kwargs):
  """Calls ``target(**kwargs)`` on ``n`` processes; returns process 0's value.

  Args:
    target: ``"module:function"``, importable from the tests folder.
    n: how many processes (an int >= 1).
    timeout: seconds for the whole launch, start to end (> 0).
    cache_dir: a folder for JAX's persistent compilation cache, shared by
      the processes (and by launches given the same folder); ``None``: none.
    **kwargs: picklable keyword arguments for every process's call.

  Returns:
    What ``target`` returned in process 0.

  Raises:
    ValueError: for a bad ``target``, ``n`` or ``timeout``.
    Unavailable: if gloo CPU collectives are not in this JAX.
    LaunchError: if a process exits with an error or the launch times out
      (every process is killed then); the message has each one's output.
  """
  if not isinstance(target, str) or target.count(":") != 1:
    raise ValueError(f"target must be 'module:function', got {target!r}.")
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be an int >= 1, got {n!r}.")
  if not timeout > 0:
    raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}.")
  with tempfile.TemporaryDirectory(prefix="jbptt-multihost-") as tmp:
    folder = pathlib.Path(tmp)
    (folder / "kwargs.pkl").write_bytes(pickle.dumps(kwargs))
    port = free_port()
    argvs = [[str(HERE / "multihost.py"), str(port), str(n), str(i), target,
              str(folder)] for i in range(n)]
    _supervise(argvs, folder, timeout, target, cache_dir)
    return pickle.loads((folder / "result.pkl").read_bytes())


def commands(argv, n: int, *, timeout: float = 120.0,
             cache_dir: str | None = None) -> list[str]:
  """Runs ``python *argv(i, port)`` as processes ``i = 0 .. n-1``, where
  ``port`` is a free port of 127.0.0.1 for their coordinator; returns each
  one's output (stdout and stderr).

  Raises:
    Unavailable, LaunchError: as :func:`launch`.
  """
  with tempfile.TemporaryDirectory(prefix="jbptt-multihost-") as tmp:
    port = free_port()
    return _supervise([list(argv(i, port)) for i in range(n)],
                      pathlib.Path(tmp), timeout, "commands", cache_dir)


def _supervise(argvs, folder: pathlib.Path, timeout: float, what: str,
               cache_dir: str | None) -> list[str]:
  """Starts one process per argument list, waits for all (at most
  ``timeout`` s, less if one fails), ends every one, returns their output."""
  n = len(argvs)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
      [str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  procs, logs = [], []
  try:
    for i, argv in enumerate(argvs):
      log = folder / f"process{i}.log"
      logs.append(log)
      with open(log, "w") as out:
        procs.append(subprocess.Popen(
            [sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
            env=env, cwd=str(HERE)))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.05)
    codes = [p.poll() for p in procs]
    if NO_GLOO in codes:
      raise Unavailable(_tail(logs[codes.index(NO_GLOO)]).strip()
                        .splitlines()[-1])
    if codes != [0] * n:
      why = ("timed out after " f"{timeout:g} s" if None in codes
             else "a process failed")
      report = "\n".join(
          f"--- process {i} (exit {c}) ---\n{_tail(log)}"
          for i, (c, log) in enumerate(zip(codes, logs)))
      raise LaunchError(f"{what} on {n} processes: {why}.\n{report}")
    return [log.read_text(errors="replace") for log in logs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()


def _worker(port: str, n: str, i: str, target: str, folder: str) -> None:
  import importlib

  import jax

  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # noqa: BLE001 -- any failure means: no gloo here
    print(f"gloo CPU collectives unavailable in jax {jax.__version__}: "
          f"{type(e).__name__}: {e}", flush=True)
    sys.exit(NO_GLOO)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(n), process_id=int(i),
                             initialization_timeout=60)
  module, name = target.split(":")
  fn = getattr(importlib.import_module(module), name)
  kwargs = pickle.loads((pathlib.Path(folder) / "kwargs.pkl").read_bytes())
  result = fn(**kwargs)
  if int(i) == 0:
    tmp = pathlib.Path(folder) / "result.pkl.tmp"
    tmp.write_bytes(pickle.dumps(result))
    os.replace(tmp, pathlib.Path(folder) / "result.pkl")
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(*sys.argv[1:])
