"""Several training processes on one machine, started by train_model.py itself (--processes).

    python train_model.py --processes=2 --device=cpu

This process checks the settings once, starts the training processes with the environment
torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), passes
every stop signal on, and waits. When one process fails, it stops the others and says in one
line which failed first, where torchrun would print its report as a Python traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType

import torch

from support.common import UserFacingError, print_line
from support.devices import resolve_device, stop_signals, torchrun_variable

LAUNCHER_VARIABLE = "MINI_GPT_LAUNCHER_PID"  # set for the processes that --processes starts
NOTICE_S = 5.0  # how long the others get to find a failed process gone, and end by themselves
GRACE_S = 15.0  # how long stopped processes get to save and leave before they are killed
ORPHAN_GRACE_S = 60.0  # the same, for processes whose launcher died (nobody else kills them)
POLL_S = 0.05
USER_ERROR = 2  # the exit status of a process that refused its settings or input, in a line


def started_by_a_launcher() -> bool:
    """Whether torchrun (or train_model.py --processes) started this process: it set RANK."""
    return "RANK" in os.environ


def starts_processes(processes: int) -> bool:
    """Whether this process should start `processes` training processes rather than train."""
    return processes > 1 and not started_by_a_launcher()


def check_processes(processes: int, requested_device: str) -> None:
    """Refuse a --processes that this machine, or the launcher that started us, cannot honour."""
    if started_by_a_launcher():
        started = torchrun_variable("LOCAL_WORLD_SIZE", 1)
        if processes not in (1, started):
            raise UserFacingError(
                f"processes is {processes} (given, or the resumed run's), but torchrun started "
                f"{started} processes on this machine; add --processes={started}"
            )
        return
    if processes == 1:
        return
    device = resolve_device(requested_device)
    cores = usable_cores()
    if device.type == "cpu" and processes > cores:
        raise UserFacingError(
            f"--processes={processes} on the CPU: this machine gives this program {cores} "
            "cores, and a process needs one at least; lower --processes"
        )
    if device.type == "mps":
        raise UserFacingError("--processes trains on cuda or cpu, not mps; add --device=cpu")
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise UserFacingError(
            f"--processes={processes} needs a GPU each, and this machine has "
            f"{torch.cuda.device_count()}; lower --processes, or add --device=cpu"
        )


def usable_cores() -> int:
    """The CPU cores this program may run on (a container or taskset may give it fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_port() -> int:
    """A TCP port that no one listens on now, for process 0 to gather the others on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment(rank: int, processes: int, port: int) -> dict[str, str]:
    """What torchrun would set for process `rank` of a job on this machine alone."""
    environment = dict(os.environ)
    # Each process computes on its share of the cores, unless the user chose (as torchrun does).
    threads = max(1, usable_cores() // processes)
    environment.setdefault("OMP_NUM_THREADS", str(threads))
    environment.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(processes),
        LOCAL_WORLD_SIZE=str(processes),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    environment[LAUNCHER_VARIABLE] = str(os.getpid())
    return environment


def stop_with_the_launcher() -> None:
    """In a process that --processes started: stop (as SIGTERM does) if the launcher dies.

    Its Ctrl-C and SIGTERM reach the processes through it; were it killed outright, they would
    otherwise train on unseen, holding the run folder. A thread looks for it every second.
    """
    launcher = os.environ.get(LAUNCHER_VARIABLE)
    if launcher is None:
        return

    def watch() -> None:
        while str(os.getppid()) == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        # Waiting for the other processes (they may be gone too), a process never gets to
        # Python's signal handler: once the stop has had its time to save, end regardless.
        time.sleep(ORPHAN_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="launcher watch", daemon=True).start()


def how_it_ended(returncode: int) -> str:
    """A process's exit status in words: 'exit status 2' or 'killed by SIGKILL'."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


class Workers:
    """The training processes of one job, started together and ended together."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.received: list[tuple[int, int]] = []  # (signal, how many processes had started)

    def start(self, script: str, argv: list[str], processes: int) -> None:
        """Start the processes; a signal that came meanwhile reaches those started after it."""
        port = free_port()
        try:
            self._start_each(script, argv, processes, port)
        except BaseException:  # e.g. no more processes allowed: none is left waiting for others
            self.signal_all(signal.SIGKILL)
            raise
        for signum, started in self.received:
            for process in self.processes[started:]:
                process.send_signal(signum)

    def _start_each(self, script: str, argv: list[str], processes: int, port: int) -> None:
        for rank in range(processes):
            # A process group of their own: a Ctrl-C in the terminal reaches this process only,
            # and is passed on once (two would mean "quit at once, unsaved").
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, script, *argv],
                    env=worker_environment(rank, processes, port),
                    process_group=0 if os.name == "posix" else None,
                )
            )

    def pass_on(self, signum: int, frame: FrameType | None) -> None:
        """A signal handler: every process gets the signal this one got."""
        self.received.append((signum, len(self.processes)))
        self.signal_all(signum)

    def signal_all(self, signum: int) -> None:
        """Send a signal to every process still running."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signum)

    def first_failure(self) -> tuple[int, int] | None:
        """(rank, exit status) of the process that failed first, if one has.

        When several are seen ended at once, one killed by a signal is the likelier cause: the
        others end soon after, when they find their peer gone.
        """
        failed = [
            (process.returncode >= 0, rank, process.returncode)
            for rank, process in enumerate(self.processes)
            if process.poll() is not None and not self.ended_as_asked(process.returncode)
        ]
        return min(failed)[1:] if failed else None

    def ended_as_asked(self, returncode: int) -> bool:
        """Whether a process ended as it should: finished, or stopped as asked.

        Stopped: saved after a Ctrl-C or SIGTERM (130), or ended by the signal passed on to it
        while it still loaded its libraries.
        """
        return returncode in (0, 130) or -returncode in {signum for signum, _ in self.received}

    def wait(self) -> tuple[int, int] | None:
        """Wait for all; at the first failure, stop the rest (killed if they do not end)."""
        while any(process.poll() is None for process in self.processes):
            failed = self.first_failure()
            if failed is not None:
                self.end_all()
                return failed
            time.sleep(POLL_S)
        return self.first_failure()

    def end_all(self) -> None:
        """After a failure: let the others end by themselves, else stop them, else kill them."""
        self.wait_a_while(NOTICE_S)  # each says in one line that a process is gone
        self.signal_all(signal.SIGTERM)
        self.wait_a_while(GRACE_S)
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def wait_a_while(self, seconds: float) -> None:
        """Wait until every process has ended, or for `seconds` at most."""
        deadline = time.monotonic() + seconds
        while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
            time.sleep(POLL_S)


def run_processes(prog: str, script: str, argv: list[str], processes: int) -> int:
    """Train with `processes` processes of `script` on this machine; returns the exit status."""
    workers = Workers()
    previous = {sig: signal.signal(sig, workers.pass_on) for sig in stop_signals()}
    try:
        workers.start(script, argv, processes)
        failed = workers.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is None:  # 0 when all finished, 130 when stopped on request
        return 0 if all(p.returncode == 0 for p in workers.processes) else 130
    rank, returncode = failed
    if returncode != USER_ERROR:  # that one said what it refused; nothing to add
        print_line(
            f"{prog}: the job ended: process {rank} of {processes} failed first "
            f"({how_it_ended(returncode)})"
        )
    return returncode if returncode > 0 else 1
