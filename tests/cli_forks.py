"""A fork server for tests that start, and kill, many `jaxflow` processes.

Most of a `jaxflow sweep` process's start-up on a small machine is importing JAX, transformers and
torch (5-10 s). The server imports them once, without initialising JAX (forking an initialised JAX
is unsafe), then forks a fresh child per request; the child runs `jaxflow.cli.main(argv)` exactly as
`python -m jaxflow.cli` would (an uncaught exception: traceback, exit 1), or a Python snippet. So
each child is a real, separate jaxflow process that a test can SIGKILL anywhere.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback


def _child(req: dict) -> None:
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    if req.get("fsize"):  # a full disk: writes past the limit fail with EFBIG (the signal would kill instead)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    code = 1
    try:
        if "argv" in req:
            from jaxflow import cli

            sys.argv = ["jaxflow", *req["argv"]]
            code = cli.main(req["argv"])
        else:
            exec(req["python"], {"__name__": "__main__"})
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(status: int) -> dict:
    return {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}


def serve(model_dir: str) -> None:
    import jax  # noqa: F401  imported, not initialised

    import jaxflow.cli  # noqa: F401
    import jaxflow.sweep.run  # noqa: F401
    from jaxflow.config import ModelConfig

    ModelConfig.from_pretrained(model_dir)  # transformers' lazily imported config modules (and torch)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir)
    from jax._src import xla_bridge

    assert not getattr(xla_bridge, "_backends", {}), "JAX was initialised before forking"
    ended: dict[int, int] = {}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(req)
            reply = {"pid": pid}
        else:  # poll
            pid = req["pid"]
            if pid not in ended:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    ended[pid] = status
            reply = {"status": _status(ended[pid]) if pid in ended else None}
        print(json.dumps(reply), flush=True)


class ForkServer:
    def __init__(self, model_dir: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, model_dir], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, log: str, argv: list[str] | None = None, python: str | None = None,
              fsize: int | None = None) -> int:
        """Forks a child running `jaxflow ARGV` (or the snippet `python`), its output into `log`;
        fsize: RLIMIT_FSIZE of the child in bytes. Returns its pid."""
        req = {"argv": argv} if argv is not None else {"python": python}
        return self._ask(op="start", log=log, fsize=fsize, **req)["pid"]

    def poll(self, pid: int) -> dict | None:
        """None while the child runs, then {"exit": code} or {"signal": number}."""
        return self._ask(op="poll", pid=pid)["status"]

    def wait(self, pid: int, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while (status := self.poll(pid)) is None:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child {pid} ran longer than {timeout} s")
            time.sleep(0.05)
        return status

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve(sys.argv[1])
