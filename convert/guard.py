"""What glm-convert does so that an interrupted or failed run leaves nothing half-written.

- The conversion runs in a worker thread; the main thread only waits for it. SIGINT, SIGTERM and SIGHUP set
  `STOP` (nothing is raised inside library code); the writers call `check_stop()` between tensors and chunks, so
  the worker unwinds through its own `finally` blocks, with every writer thread joined and every in-flight
  tensorstore write awaited. Only then is the temporary folder removed. A second signal while that happens
  removes the folder at once and ends the process (`os._exit`: no interpreter teardown to kill the C++ threads
  of tensorstore mid-unwind, the cause of the earlier `FATAL: exception not rethrown`).
- Output is built in `.DST.tmp-PID` beside DST; an existing DST is moved to `.DST.old-PID` only for the instant
  of the final rename. `remove_stale` clears what a killed run (SIGKILL, power loss) left: temporary folders of
  processes that no longer run are deleted, and an `.old-PID` folder whose DST is missing is put back as DST.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import threading

STOP = threading.Event()
_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(Exception):
    """Raised in the worker when a signal asked glm-convert to stop; exit code 128 + the signal's number."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalInterrupt(KeyboardInterrupt):
    """What SIGTERM and SIGHUP raise outside the conversion proper (start-up, imports), as SIGINT does."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_interrupt(signum, frame):
    raise SignalInterrupt(signum)


def interrupt_on_signals():
    """SIGTERM and SIGHUP raise SignalInterrupt in the main thread, as SIGINT raises KeyboardInterrupt (for the
    command line only: the process ends after main)."""
    for name in _SIGNALS[1:]:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_interrupt)


def check_stop():
    """Raise Interrupted when a signal has asked the conversion to stop (called between units of work)."""
    if STOP.is_set():
        raise Interrupted(_state.get("signum", signal.SIGINT))


_state: dict = {}


def _on_signal(signum, frame):
    if STOP.is_set():  # a second signal: stop now
        tmp = _state.get("tmp")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        os.write(2, b"error: interrupted\n")
        os._exit(128 + signum)
    _state["signum"] = signum
    STOP.set()


class SignalsStop:
    """Within this block (entered in the main thread), SIGINT, SIGTERM and SIGHUP only set STOP; a second one
    removes `tmp` and ends the process. Elsewhere, or in another thread, the block changes nothing."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp, self.old = tmp, {}

    def __enter__(self):
        STOP.clear()
        _state.clear()
        if threading.current_thread() is not threading.main_thread():
            return self
        _state["tmp"] = self.tmp
        for name in _SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # respect nohup, background jobs
                self.old[sig] = signal.signal(sig, _on_signal)
        return self

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        _state.pop("tmp", None)


def run_in_worker(fn):
    """fn() in a worker thread while the main thread waits, free to run the signal handlers; fn's result or its
    exception, or Interrupted once the worker has ended after a signal. In another thread than the main one,
    fn runs in the caller's thread."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    result: dict = {}

    def work():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the main thread below
            result["error"] = e

    t = threading.Thread(target=work, name="glm-convert-work")
    t.start()
    while t.is_alive():
        t.join(0.1)
    check_stop()
    if "error" in result:
        raise result["error"]
    return result["value"]


# ------------------------------------------------------------------ temporary folders beside DST
def tmp_path(dst: pathlib.Path) -> pathlib.Path:
    return dst.parent / f".{dst.name}.tmp-{os.getpid()}"


def old_path(dst: pathlib.Path) -> pathlib.Path:
    return dst.parent / f".{dst.name}.old-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or an absurd number): leave its folder alone
    return True


def remove_stale(dst: pathlib.Path) -> list:
    """Clear the `.DST.tmp-PID` / `.DST.old-PID` folders of dead glm-convert processes beside dst; returns what was
    done, one phrase per folder (empty when nothing was stale)."""
    done = []
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(\d+)")
    try:
        entries = sorted(dst.parent.iterdir()) if dst.parent.is_dir() else []
    except OSError:
        return done
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m is None or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not (dst.exists() or dst.is_symlink()):
            os.replace(p, dst)  # killed between the two renames: the previous DST comes back
            done.append(f"restored {dst} from {p.name}")
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        done.append(f"removed {p}")
    return done


def make_parents(folder: pathlib.Path) -> list:
    """mkdir -p folder; returns the folders it created (deepest last), for `remove_parents` on failure."""
    missing = []
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
    return list(reversed(missing))


def remove_parents(created: list):
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break
