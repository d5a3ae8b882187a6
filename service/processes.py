"""Child processes that end with their parent, and ports that say who holds them (stdlib only).

Every long-lived process cxrsynth starts (the demo's ``bentoml serve`` and training steps, the test
suite's servers) is started by :func:`spawn`: in a session of its own, so that stopping it reaches its
whole tree (``bentoml serve`` runs an arbiter and workers, torchrun runs one process per rank) and a
terminal's Ctrl+C reaches only the parent, which then stops the tree in order; and, on Linux, with
``PR_SET_PDEATHSIG``, so that it gets SIGTERM even when its parent is killed with SIGKILL and cannot
clean up. :func:`stop_group` stops such a tree; :func:`exit_on_signals` turns SIGTERM, SIGINT and
SIGHUP into one exception, so that ``finally`` blocks run and stop the children (by default SIGTERM
and SIGHUP end Python at once, running none).

:func:`check_port_free` tells, before a server starts, whether a port is free, and if not which
process holds it (from ``/proc/net/tcp*`` and ``/proc/*/fd`` on Linux).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sets PR_SET_PDEATHSIG (prctl option 1) to SIGTERM, then becomes the command: the setting survives
# exec. A process of its own rather than a preexec_fn, which is unsafe once threads run (tqdm's
# monitor, BentoML's). It checks that the parent is still there, as the parent may die first.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or os.kill(os.getpid(), signal.SIGTERM); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


class Stopped(BaseException):
    """Raised in the main thread by a termination signal (see :func:`exit_on_signals`).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    ``signum`` is the signal; :attr:`exit_code` is the shell's convention, 128 + signum.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
                    ) -> Iterator[None]:
    """Within the block, the first of ``signals`` raises :class:`Stopped` in the main thread.

    Later ones are ignored, so a second Ctrl+C cannot cut short the clean-up the first one started
    (every wait in :func:`stop_group` is bounded). The previous handlers are restored on exit.
    Call from the main thread only (Python delivers signals there).
    """
    stopping = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            print(f"{signal.Signals(signum).name}: already stopping", file=sys.stderr, flush=True)
            return
        stopping = True
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def spawn(command: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start ``command`` as the leader of a new session that ends with this process.

    ``popen`` goes to :class:`subprocess.Popen` (``env``, ``cwd``, ``stdout``...); the process's pid
    is the command's. On Linux the command gets SIGTERM when this thread ends, so call this from a
    thread that lives as long as the child should (the main thread). Stop it with :func:`stop_group`.
    """
    if sys.platform.startswith("linux"):
        command = [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]
    return subprocess.Popen(list(command), start_new_session=True, **popen)


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running.

    On Linux from /proc, where a zombie counts as gone: a member orphaned by its leader is reparented
    to PID 1, which in a container may never reap it. Elsewhere, whether the group can be signalled.
    """
    if not sys.platform.startswith("linux"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name may hold spaces and parentheses: the fields start after the last ')'
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(process: subprocess.Popen, timeout: float = 20.0) -> int | None:
    """SIGTERM the process group led by ``process`` (started by :func:`spawn`), SIGKILL what outlives
    ``timeout`` seconds, and reap the leader. Returns the leader's exit code (None if it could not be
    reaped). Members that outlive their leader are waited for too: ``bentoml serve``'s workers may
    still be shutting down when the arbiter has exited."""
    pgid = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None or _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    return process.returncode


def run_step(command: Sequence[str], **popen: Any) -> int:
    """Run ``command`` to its end with :func:`spawn` and return its exit code; if this process is
    stopped meanwhile (an exception, :class:`Stopped` or KeyboardInterrupt included), stop its whole
    tree first. The timeout leaves a trainer time to write the checkpoint it writes on SIGTERM."""
    process = spawn(command, **popen)
    try:
        return process.wait()
    finally:
        if process.poll() is None:
            stop_group(process, timeout=120.0)


# -- ports -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PortHolder:
    pid: int
    command: str


class PortInUse(RuntimeError):
    """A TCP port that a server was to listen on is taken. ``holder`` is who holds it, when known."""

    def __init__(self, host: str, port: int, holder: PortHolder | None, hint: str):
        self.host = host
        self.port = port
        self.holder = holder
        who = (f"process {holder.pid} ({holder.command})" if holder is not None
               else "another process (its owner is not visible to this user)")
        super().__init__(f"port {port} on {host} is already in use by {who}; {hint}")


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address), from /proc/net/tcp and tcp6."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN
            if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> PortHolder | None:
    """The process listening on TCP ``port``, if /proc shows it to this user; else None."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            descriptors = list((entry / "fd").iterdir())
        except OSError:  # another user's process, or gone
            continue
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target in inodes:
                try:
                    raw = (entry / "cmdline").read_bytes()
                except OSError:
                    raw = b""
                command = raw.replace(b"\0", b" ").decode(errors="replace").strip() or entry.name
                return PortHolder(int(entry.name), command[:200])
    return None


def check_port_free(host: str, port: int, hint: str) -> None:
    """Raise :class:`PortInUse` (its message names the port, the holder when known, and ``hint``) if
    a server could not listen on ``host``:``port`` now. Binding, rather than connecting, also finds a
    port held by a listener that does not accept."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as servers bind: a port left in TIME_WAIT by a stopped server is free to reuse
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(host, port, port_holder(port), hint) from None
