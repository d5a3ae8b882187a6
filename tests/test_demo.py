"""The demo's processes end with it: `python -m service.demo` on the `ci` bundle (valid, so nothing is
trained), stopped by SIGTERM, SIGINT or SIGKILL, leaves no process behind and its port free; a port
that is taken is a message naming the port and its holder, before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from service.processes import spawn, stop_group

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...); None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's zombie waits for PID 1, which in a container may never
    reap it)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def demo_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CXRSYNTH_")}
    return {**env, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", "OMP_NUM_THREADS": "1"}


class Demo:
    """`python -m service.demo` as `make demo` runs it, output to a file the test reads as it grows."""

    def __init__(self, bundle: Path, tmp_path: Path, *extra: str):
        self.port = free_port()
        self.output_path = tmp_path / "demo.out"
        command = [sys.executable, "-m", "service.demo", "--bundle", str(bundle),
                   "--output", str(tmp_path / "out"), "--port", str(self.port), "--count", "1", *extra]
        with open(self.output_path, "wb") as output:
            # spawn: should this test die, the demo gets SIGTERM and stops its own children
            self.process = spawn(command, cwd=ROOT, env=demo_env(tmp_path / "bentoml"), stdout=output,
                                 stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 300.0) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                tail = self.output()[-3000:]
                raise AssertionError(f"the demo exited with {self.process.returncode}:\n{tail}")
            return text in self.output()

        wait_for(seen, timeout, f"{text!r} in the demo's output")

    def children(self) -> set[int]:
        family = descendants(self.process.pid)
        assert family, "the demo has started no server"
        return family

    def close(self) -> None:
        if self.process.poll() is None:
            stop_group(self.process)


@pytest.fixture
def demo_factory(ci_bundle, tmp_path):
    started: list[Demo] = []

    def start(*extra: str) -> Demo:
        started.append(Demo(ci_bundle, tmp_path, *extra))
        return started[-1]

    yield start
    for demo in started:
        demo.close()


def assert_all_gone(demo: Demo, family: set[int]) -> None:
    wait_for(lambda: not any(running(pid) for pid in family), 60,
             f"every process the demo started ({family}) ends")
    wait_for(lambda: port_is_free(demo.port), 30, f"port {demo.port} is free again")


def test_sigterm_while_generating_stops_the_server_too(demo_factory):
    demo = demo_factory()
    demo.wait_for_output("service ready at")  # it goes on to ask /generate per finding
    family = demo.children()
    demo.process.send_signal(signal.SIGTERM)
    assert demo.process.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; everything the demo started is stopped" in demo.output()
    assert "Traceback" not in demo.output()
    assert_all_gone(demo, family)


def test_ctrl_c_while_serving_ends_the_demo_and_its_server(demo_factory):
    demo = demo_factory()
    demo.wait_for_output("Serving until Ctrl+C")
    family = demo.children()
    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=60) == 0  # the way a serving demo is meant to end
    assert "Traceback" not in demo.output()
    assert_all_gone(demo, family)


def test_the_server_ends_even_when_the_demo_is_killed_outright(demo_factory):
    demo = demo_factory()
    demo.wait_for_output("service ready at")
    family = demo.children()
    demo.process.send_signal(signal.SIGKILL)  # no clean-up runs: the parent-death signal must do it
    demo.process.wait(timeout=10)
    assert_all_gone(demo, family)


def test_a_taken_port_is_named_with_its_holder_before_anything_starts(tmp_path):
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with closing(holder):
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        missing = tmp_path / "no-bundle"  # would be trained, for an hour, were the port not checked first
        env = demo_env(tmp_path / "bentoml")
        for how, extra in (("--port", ["--port", str(port)]), ("CXRSYNTH_PORT", [])):
            result = subprocess.run(
                [sys.executable, "-m", "service.demo", "--bundle", str(missing),
                 "--output", str(tmp_path / "out"), *extra],
                cwd=ROOT, env={**env, "CXRSYNTH_PORT": str(port)} if how == "CXRSYNTH_PORT" else env,
                capture_output=True, text=True, timeout=120, check=False,
            )
            assert result.returncode == 1, (how, result.stdout, result.stderr)
            message = result.stderr
            assert f"port {port} on 127.0.0.1 is already in use by process {os.getpid()}" in message, how
            assert "--port N (or CXRSYNTH_PORT=N)" in message and "Traceback" not in message, (how, message)
            assert not missing.exists() and "training" not in result.stdout, (how, result.stdout)


def test_a_bad_port_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service.demo", "--port", "70000"], cwd=ROOT,
                            env=demo_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "--port" in result.stderr and "Traceback" not in result.stderr


def test_a_stopped_training_step_takes_its_own_children_with_it(tmp_path):
    """The demo's training steps run through run_step: a step's whole tree (torchrun and its ranks)
    ends when the demo is stopped. Here the step is a process that starts a child of its own."""
    step = ("import os, subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(os.getpid(), child.pid, flush=True); time.sleep(600)")
    script = ("import sys; from service.processes import Stopped, exit_on_signals, run_step\n"
              "with exit_on_signals():\n"
              "    try:\n"
              f"        run_step([sys.executable, '-c', {step!r}])\n"
              "    except Stopped as stop:\n"
              "        print(stop, flush=True); sys.exit(stop.exit_code)\n")
    output_path = tmp_path / "out.txt"
    with open(output_path, "wb") as output:
        parent = spawn([sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(), stdout=output,
                       stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: output_path.read_text().strip() != "", 60, "the step printed its pids")
        family = {int(pid) for pid in output_path.read_text().split()[:2]}
        assert all(running(pid) for pid in family)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        assert "stopped by SIGTERM" in output_path.read_text()
        wait_for(lambda: not any(running(pid) for pid in family), 30,
                 f"the step and its child ({family}) end")
    finally:
        stop_group(parent)


def test_the_shipped_demo_bundle_is_whole_small_and_the_one_pinned():
    from service.bundle import verify_bundle
    from service.demo import DEFAULT_BUNDLE, DEMO_PIN, check_pin

    verify_bundle(DEFAULT_BUNDLE)  # every graph's sha256 against the manifest
    check_pin(DEFAULT_BUNDLE, DEMO_PIN)  # the manifest against the repository's pin
    assert sum(path.stat().st_size for path in DEFAULT_BUNDLE.iterdir()) <= 20 * 2**20


def test_a_bundle_that_is_not_the_pinned_one_is_refused_and_pinning_it_admits_it(ci_bundle, tmp_path):
    from service.demo import check_pin
    from training.demo_bundle import write_pin

    pin = tmp_path / "demo.sha256"
    pin.write_text("0" * 64 + "\n")
    with pytest.raises(SystemExit, match="make demo-bundle"):
        check_pin(ci_bundle, pin)
    write_pin(ci_bundle, pin)
    check_pin(ci_bundle, pin)
