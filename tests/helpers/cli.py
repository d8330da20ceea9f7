"""Running the commands (glm-train, glm-convert, glm-generate, glm-eval) as a test sees them: their main() in this
process, or the module in a subprocess (a fresh JAX backend, real exit codes, real signals); either way the exit
code and the two output streams come back as one Result.

The house rule for bad input is checked in one place: exit 2 and exactly one `error:` line on stderr."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from helpers import ROOT


@dataclasses.dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one `error:` line of a refused input (exit 2, nothing else on stderr)."""
        lines = self.err.strip().splitlines()
        assert self.code == 2, (self.code, self.err)
        assert len(lines) == 1 and lines[0].startswith("error: "), self.err
        return lines[0]

    def __iter__(self):  # rc, out, err = result
        return iter((self.code, self.out, self.err))


def subprocess_env(devices: int | None = 8, **extra) -> dict:
    """The environment of a command in a subprocess: this checkout's code first, CPU JAX with `devices` fake devices
    (None: XLA_FLAGS unset, i.e. one device)."""
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    if devices is None:
        e.pop("XLA_FLAGS", None)
    else:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e.update(extra)
    return e


def module_argv(module: str, *args) -> list[str]:
    """argv running `python -m module args` with this interpreter; bytes args are passed as the OS passes them."""
    return [sys.executable, "-m", module, *(a if isinstance(a, bytes) else str(a) for a in args)]


def run_module(module: str, *args, stdin: str | bytes | None = None, devices: int | None = 8, timeout=300, **extra):
    """`python -m module args` in a subprocess from the repository root; text in and out (UTF-8) unless stdin is
    bytes, when the outputs are decoded from UTF-8 here."""
    text = not isinstance(stdin, bytes)
    p = subprocess.run(
        module_argv(module, *args),
        input=stdin,
        capture_output=True,
        text=text,
        encoding="utf-8" if text else None,
        cwd=ROOT,
        env=subprocess_env(devices, **extra),
        timeout=timeout,
    )
    if text:
        return Result(p.returncode, p.stdout, p.stderr)
    return Result(p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8"))


def run_generate(*argv, stdin: str = "") -> Result:
    """glm-generate's main() in this process, with its streams as arguments (stdin, stdout, stderr)."""
    import io

    from glm_jax import cli_generate

    out, err = io.StringIO(), io.StringIO()
    code = cli_generate.main([str(a) for a in argv], io.StringIO(stdin), out, err)
    return Result(code, out.getvalue(), err.getvalue())


def run_main(capture, main, *argv) -> Result:
    """main([argv as str]) in this process; capture is pytest's capsys or capfd (capfd also sees what C++ writes
    to the file descriptors)."""
    capture.readouterr()
    code = main([str(a) for a in argv])
    out, err = capture.readouterr()
    return Result(code, out, err)
