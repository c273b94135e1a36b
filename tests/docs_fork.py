"""A fork server for the docs test: import torch, transformers and rankwise once, fork per command.

Every ``rankwise`` line of a docs bash block, and every docs file's block runner, used to start a
fresh Python that spent ~4 s importing the same modules before doing a second of work. Here one
server process imports them once (it runs no tensor code, so no thread pool exists to break in a
fork); each request is answered by a fork of it, which is still a separate process with its own
argv, working directory, environment, stdin/stdout/stderr and exit status, so a docs command
behaves as it would from a shell. Only what a module reads at import time comes from the
server's environment (the docs test's), not the command's.

    python tests/docs_fork.py serve SOCKET                  # the server (a test fixture starts it)
    python -S tests/docs_fork.py SOCKET cli ARGS...         # `rankwise ARGS...` in a fork
    python -S tests/docs_fork.py SOCKET run SCRIPT ARGS...  # `python SCRIPT ARGS...` in a fork

The client forwards SIGINT/SIGTERM/SIGHUP to its fork and exits with the fork's status; if the
client dies (a test timeout), the server kills the fork's process group. With no server at
SOCKET the client runs the command in a fresh interpreter instead.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys

CLI = "import sys; from rankwise.cli import main; sys.exit(main())"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _preload() -> None:
    """What nearly every docs command imports; importing defines no tensors and starts no pool."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoTokenizer, BertModel, LlamaForCausalLM  # noqa: F401

    import rankwise  # noqa: F401
    import rankwise.cli  # noqa: F401
    import rankwise.compress  # noqa: F401
    import rankwise.eval  # noqa: F401
    import rankwise.models  # noqa: F401


def serve(path: str) -> None:
    """Accept requests on the Unix socket `path` until terminated; one fork per request."""
    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    waiting: dict[socket.socket, int] = {}  # client connection -> its fork's pid
    while True:
        ready = select.select([listener, *waiting], [], [], 0.05)[0]
        for conn in ready:
            if conn is listener:
                _accept(listener, waiting)
            elif not conn.recv(16):  # the client is gone before its fork finished
                _kill_group(waiting.pop(conn))
                conn.close()
        _reap(waiting)


def _accept(listener: socket.socket, waiting: dict[socket.socket, int]) -> None:
    conn, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        listener.close()
        for other in waiting:
            other.close()
        conn.close()
        _child(request, fds)
    for fd in fds:
        os.close(fd)
    conn.send(f"{pid}".encode())
    waiting[conn] = pid


def _reap(waiting: dict[socket.socket, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for conn, child in list(waiting.items()):
            if child == pid:
                del waiting[conn]
                try:
                    conn.send(f"{os.waitstatus_to_exitcode(status)}".encode())
                except OSError:
                    pass
                conn.close()


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass


def _child(request: dict, fds: list[int]) -> None:
    """Become the requested command: its stdio, directory, environment and argv; never returns."""
    import atexit
    import runpy
    import traceback

    os.setpgid(0, 0)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    sys.argv = list(request["argv"])
    code: object = 0
    try:
        if request["kind"] == "cli":
            from rankwise.cli import main

            code = main(sys.argv[1:])
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - a crash prints its traceback and exits 1, as Python does
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def client(path: str, kind: str, argv: list[str]) -> int:
    """Have the server at `path` run `argv` in a fork with this process's stdio; its exit code."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:  # no server: a fresh interpreter does the same
        command = ["-c", CLI, *argv[1:]] if kind == "cli" else argv
        os.execv(sys.executable, [sys.executable, *command])
    request = {"kind": kind, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    pid = int(conn.recv(64))
    for sig in FORWARDED:
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    code = int(conn.recv(64))
    if code < 0:  # killed by a signal: die the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        path, kind, *rest = sys.argv[1:]
        sys.exit(client(path, kind, ["rankwise", *rest] if kind == "cli" else rest))
