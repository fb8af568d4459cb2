"""``dvc repro --single-item ITEM`` as a child process: its output relayed to a logger at each line's own
level, its failure told as the stage's own error line and classed transient (worth a retry) or not.

Why this is safe to run for several items at once in one repository: DVC holds its repo lock while it reads
the project and while it records the result (dvc.lock, the cache), but releases it while the stage's command
runs (``dvc.stage.decorators.unlocked_repo``); a per-path read/write lock (``.dvc/tmp/rwlock``) keeps two
commands off the same outputs. ``--wait-for-lock`` makes a process that finds the repo lock taken wait for it
instead of failing after 3 s, which is what it would otherwise do when two items finish together.

Levels: a stage process started here logs JSON lines (``LONGLIVE_LOG_FORMAT=json``, stages/_common.py), so
each record keeps its level and its traceback; DVC's own ``ERROR:``/``WARNING:`` lines, torch's glog lines
(``W1206 ...``) and Python tracebacks are recognised; other stderr text (a library's own handler, a bare
``print(..., file=sys.stderr)``) counts as a warning, progress bars and stdout as info.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

LOG_FORMAT_ENV = "LONGLIVE_LOG_FORMAT"  # read by stages/_common.py

# A stage that knows its failure is temporary (a busy service, a lost lease) exits with EX_TEMPFAIL.
EX_TEMPFAIL = 75
# Preemption: spot reclaim, SLURM/Kubernetes eviction send SIGTERM, then SIGKILL after the grace period (an
# out-of-memory kill is also SIGKILL: it is retried too, and fails again within the retry budget).
TRANSIENT_SIGNALS = {signal.SIGTERM, signal.SIGKILL, signal.SIGHUP, signal.SIGINT}
# Matched against the stage's error line only (never against warnings earlier in the log).
TRANSIENT_ERRORS = re.compile(
    r"\b(ConnectionError|ConnectionResetError|ConnectionRefusedError|ConnectionAbortedError|BrokenPipeError"
    r"|TimeoutError|socket\.timeout|ReadTimeout|ConnectTimeout|ReadTimeoutError|ConnectTimeoutError"
    r"|RemoteDisconnected|IncompleteRead|ProtocolError|NewConnectionError|MaxRetryError"
    r"|EndpointConnectionError|ConnectionClosedError|ServiceUnavailable|SlowDown|RequestTimeout|Throttling"
    r"|Temporary failure in name resolution|Network is unreachable|Connection reset by peer"
    r"|(HTTP|status|code)[^0-9]{0,4}(429|502|503|504)\b"
    r"|CUDA-capable device\(s\) is/are busy or unavailable)")
# DVC's own failures that a later attempt gets past: another process held a lock for too long.
TRANSIENT_DVC = re.compile(r"Unable to acquire lock|is busy, it is being blocked by")

_GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ")  # torch, absl, grpc
_GLOG_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_PROGRESS = re.compile(r"\d+%\|.*\||\b\d+(\.\d+)?(it|s)/(s|it)\b")  # tqdm
_DVC_LINE = re.compile(r"^(ERROR|WARNING): ")
# DVC's closing hints for a person at a terminal (git add, autostage, dvc push): DEBUG in a flow run's log
_DVC_HINTS = re.compile(r"^(To track the changes with git, run:|To enable auto staging, run:|\s+git add |"
                        r"\s+dvc config core\.autostage true|Use `dvc push` to send your updates)")
_EXIT = re.compile(r"exited with (-?\d+)\s*$")


@dataclass
class Outcome:
    item: str
    returncode: int
    seconds: float
    ran: bool                      # the stage's command started (False: DVC found it up to date or restored it)
    error: str | None = None       # the stage's own error line (None when it succeeded)
    detail: str | None = None      # DVC's account of the failure
    exit_status: int | None = None # the stage command's exit status as DVC reports it
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def message(self) -> str:
        """First line: the stage's own error. Then which item, and what DVC said."""
        return f"{self.error}\n{self.item}: {self.detail or f'dvc repro exited {self.returncode}'}"


class StageFailed(RuntimeError):
    """An item failed; ``str()`` leads with the stage's own error line. ``transient``: a retry may succeed."""

    def __init__(self, message: str, transient: bool, outcome: Outcome | None = None):
        super().__init__(message)
        self.transient = transient
        self.outcome = outcome


@dataclass
class _Reader:
    """Turns one stream's lines into (level, text) records and remembers the stage's last error line."""

    log: logging.Logger | logging.LoggerAdapter
    stream: str                                  # "stdout" or "stderr"
    last_error: list = field(default_factory=lambda: [None])  # shared by both readers: the latest error line
    dvc_errors: list[str] = field(default_factory=list)
    ran: list[bool] = field(default_factory=lambda: [False])
    _traceback: list[str] = field(default_factory=list)

    def _emit(self, level: int, text: str, error_line: str | None = None) -> None:
        self.log.log(level, "%s", text)
        if error_line:
            self.last_error[0] = error_line

    def feed(self, raw: str) -> None:
        # a progress bar redraws with \r: keep its last state only
        line = [seg for seg in raw.rstrip("\n").split("\r") if seg.strip()]
        if not line:
            return
        line = line[-1].rstrip()
        if self._traceback:  # inside a Python traceback: indented lines and chaining notes belong to it
            if line.startswith((" ", "\t")) or line.startswith(("Traceback (most recent", "During handling",
                                                                  "The above exception")):
                self._traceback.append(line)
                return
            self._traceback.append(line)  # the exception line closes it
            self._flush_traceback()
            return
        if line.startswith("{") and line.endswith("}"):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict) and {"level", "logger", "message"} <= rec.keys():
                level = logging.getLevelName(str(rec["level"]))
                level = level if isinstance(level, int) else logging.INFO
                msg = str(rec["message"])
                self.ran[0] = True
                last = next((ln for ln in reversed(msg.splitlines()) if ln.strip()), msg)
                self._emit(level, f"{rec['logger']}: {msg}", last.strip() if level >= logging.ERROR else None)
                return
        if line.startswith("Running stage '"):
            self.ran[0] = True
        if self.stream == "stdout":
            self._emit(logging.DEBUG if _DVC_HINTS.match(line) else logging.INFO, line)
            return
        m = _DVC_LINE.match(line)
        if m:
            level = logging.ERROR if m.group(1) == "ERROR" else logging.WARNING
            if level == logging.ERROR:
                self.dvc_errors.append(line[len("ERROR: "):])
            self._emit(level, line)
            return
        if line.startswith("Traceback (most recent call last)"):
            self._traceback = [line]
            return
        m = _GLOG.match(line)
        if m:
            level = _GLOG_LEVELS[m.group(1)]
            self._emit(level, line, line if level >= logging.ERROR else None)
            return
        if _PROGRESS.search(line):
            self._emit(logging.INFO, line)
            return
        # text on stderr outside logging: a library's own handler, a print, sys.exit("stage: why")
        self._emit(logging.WARNING, line, line)

    def _flush_traceback(self) -> None:
        block, self._traceback = self._traceback, []
        self._emit(logging.ERROR, "\n".join(block), block[-1].strip())

    def close(self) -> None:
        if self._traceback:
            self._flush_traceback()


def classify(exit_status: int | None, error: str | None, dvc_errors: list[str]) -> bool:
    """True when a retry can succeed: preemption (SIGTERM/SIGKILL/SIGHUP/SIGINT), EX_TEMPFAIL, a network
    error as the stage's error line, or a DVC lock held too long. Everything else is deterministic."""
    if exit_status is not None:
        sig = -exit_status if exit_status < 0 else exit_status - 128 if exit_status > 128 else None
        if exit_status == EX_TEMPFAIL or (sig is not None and sig in {int(s) for s in TRANSIENT_SIGNALS}):
            return True
    if error and TRANSIENT_ERRORS.search(error):
        return True
    return any(TRANSIENT_DVC.search(e) for e in dvc_errors)


def _signal_name(status: int | None) -> str | None:
    if status is None:
        return None
    sig = -status if status < 0 else status - 128 if status > 128 else None
    try:
        return signal.Signals(sig).name if sig else None
    except ValueError:
        return None


def repro_command(item: str, dvc: str = "dvc") -> list[str]:
    return [dvc, "--wait-for-lock", "repro", "--single-item", item]


def run_repro(item: str, repo_dir: str | Path, log: logging.Logger | logging.LoggerAdapter,
              dvc: str | None = None, env: dict | None = None) -> Outcome:
    """Run ``dvc repro --single-item ITEM`` in ``repo_dir``; every output line goes to ``log`` at its level."""
    dvc = dvc or dvc_executable()
    env = {**(env if env is not None else os.environ), LOG_FORMAT_ENV: "json", "PYTHONUNBUFFERED": "1"}
    # the `python` of dvc.yaml's commands is this environment's, activated or not (a worker's service unit)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    start = time.monotonic()
    proc = subprocess.Popen(repro_command(item, dvc), cwd=repo_dir, env=env, text=True, bufsize=1,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, errors="replace")
    last_error: list = [None]
    dvc_errors: list[str] = []
    ran = [False]
    readers = [_Reader(log, "stdout", last_error, dvc_errors, ran), _Reader(log, "stderr", last_error, dvc_errors, ran)]

    def pump(reader: _Reader, stream) -> None:
        for raw in stream:
            reader.feed(raw)
        reader.close()

    threads = [threading.Thread(target=pump, args=(r, s), daemon=True) for r, s in zip(readers, (proc.stdout, proc.stderr))]
    for t in threads:
        t.start()
    try:
        returncode = proc.wait()
    except BaseException:  # the task was cancelled or the flow process is going down: do not leave DVC running
        proc.terminate()
        proc.wait()
        raise
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    if returncode == 0:
        return Outcome(item, 0, seconds, ran[0])
    detail = dvc_errors[0] if dvc_errors else None
    m = _EXIT.search(detail or "")
    status = int(m.group(1)) if m else None
    sig = _signal_name(status)
    if sig:  # killed from outside: whatever it printed last is not why it stopped
        error = f"{item} was stopped by {sig}"
    else:
        error = last_error[0] or detail or f"dvc repro --single-item {item} exited {returncode} without a message"
    return Outcome(item, returncode, seconds, ran[0], error=error, detail=detail, exit_status=status,
                   transient=classify(status, error, dvc_errors))


def dvc_executable() -> str:
    """The ``dvc`` beside this interpreter (the flow's environment) if there is one, else the one on PATH."""
    here = Path(sys.executable).with_name("dvc")
    return str(here) if here.exists() else "dvc"
