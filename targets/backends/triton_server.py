"""Find, prepare and run a real ``tritonserver`` on loopback.

Without the NGC container, the server is the one the ``nvidia-pytriton`` wheel bundles (its only
backend is Python). That wheel pins numpy < 2, so it lives in a virtual environment of its own
(``green-mlops triton install``; default ``~/.cache/green-mlops/triton-venv``, or
``$GREEN_MLOPS_TRITON_VENV``) with ONNX Runtime for the repository's ``python`` flavour.

Facts this code relies on: the Python backend stub must load the libpython of the interpreter it
was built for (``LD_LIBRARY_PATH`` = that interpreter's ``LIBDIR``; a Debian system libpython
fails model load with ``_recursion_count``); the stub's ``sys.path`` must reach numpy and ONNX
Runtime (``PYTHONPATH`` = the venv's site-packages); ``--exit-on-error=false`` keeps serving when
one model fails; SIGTERM stops the server.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from targets.child_process import die_with_parent, preexec_steps
from targets.cpus import pin_to
from targets.errors import BackendError

DEFAULT_VENV = Path.home() / ".cache" / "green-mlops" / "triton-venv"
PYTRITON_PACKAGES = ("nvidia-pytriton==0.7.0", "onnxruntime")


def triton_venv() -> Path:
    return Path(os.environ.get("GREEN_MLOPS_TRITON_VENV", DEFAULT_VENV))


def installed(venv: Path) -> bool:
    """Whether ``venv`` already holds every one of PYTRITON_PACKAGES (at the pinned versions)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    code = ("import sys\nfrom importlib.metadata import version, PackageNotFoundError\n"
            "for spec in sys.argv[1:]:\n"
            "    name, _, pinned = spec.partition('==')\n"
            "    try:\n        found = version(name)\n"
            "    except PackageNotFoundError:\n        sys.exit(1)\n"
            "    if pinned and found != pinned:\n        sys.exit(1)\n")
    result = subprocess.run([str(python), "-c", code, *PYTRITON_PACKAGES], capture_output=True, timeout=60)
    return result.returncode == 0


def install_venv(venv: Path | None = None, log=print) -> Path:
    """Create the server's own virtual environment: nvidia-pytriton and ONNX Runtime (nothing to
    do, and says so, when they are already there)."""
    venv = venv or triton_venv()
    if installed(venv):
        log(f"{' and '.join(PYTRITON_PACKAGES)} already installed in {venv}: nothing to download")
        return venv
    if not (venv / "bin" / "python").exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"installing {' '.join(PYTRITON_PACKAGES)} into {venv} (about 400 MB)")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *PYTRITON_PACKAGES], check=True)
    return venv


@dataclass(frozen=True)
class ServerInstall:
    binary: Path
    backends: Path | None  # pytriton layout: backends/python without the stub
    stubs: Path | None  # pytriton layout: python_backend_stubs/<X.Y>/triton_python_backend_stub
    python: Path | None  # the interpreter whose libpython and site-packages the stub uses
    libs: Path | None  # pytriton's bundled shared libraries (CUDA runtime and others)


def find_server(explicit: str | Path | None = None) -> ServerInstall:
    """The server: ``explicit``, ``$TRITONSERVER``, ``tritonserver`` on PATH, or the pytriton venv."""
    for candidate in (explicit, os.environ.get("TRITONSERVER"), shutil.which("tritonserver")):
        if candidate and Path(candidate).is_file():
            return ServerInstall(Path(candidate), None, None, None, None)
    venv = triton_venv()
    for root in sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver")):
        if (root / "bin" / "tritonserver").is_file():
            return ServerInstall(root / "bin" / "tritonserver", root / "backends", root / "python_backend_stubs",
                                 venv / "bin" / "python", root.parent.parent / "nvidia_pytriton.libs")
    raise BackendError("no tritonserver found: pass --server, set TRITONSERVER, put it on PATH, "
                       f"or run 'green-mlops triton install' (creates {venv})")


def _python_facts(python: Path) -> tuple[str, str, str]:
    """(X.Y version, LIBDIR, site-packages) of the interpreter the stub will embed."""
    code = ("import sys, sysconfig; print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
            "print(sysconfig.get_config_var('LIBDIR')); print(sysconfig.get_paths()['purelib'])")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    return out[0], out[1], out[2]


class TritonServer:
    """A running tritonserver bound to 127.0.0.1; ``stop()`` (SIGTERM) ends it.

    The server never outlives this object's process: it dies with it (SIGTERM from the kernel,
    even when this process is killed with SIGKILL), and a failed or interrupted start (Ctrl-C
    while waiting for readiness) stops it before the exception leaves the constructor.
    """

    process: subprocess.Popen | None = None

    def __init__(self, repo: Path, http_port: int = 0, metrics_port: int = 0, server: str | Path | None = None,
                 startup_timeout_s: float = 60.0, log_path: Path | None = None, cpus: list[int] | None = None):
        """``cpus`` pins the server (and every backend process it starts) to those CPUs."""
        self.cpus = list(cpus) if cpus else None
        install = find_server(server)
        self.http_port = http_port or _free_port()
        self.metrics_port = metrics_port or _free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="green-mlops-triton-")
        try:
            self._start(install, repo, log_path, startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, install: ServerInstall, repo: Path, log_path: Path | None, startup_timeout_s: float) -> None:
        env = dict(os.environ)
        command = [str(install.binary), "--model-repository", str(Path(repo).resolve()),
                   "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                   "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                   "--allow-grpc", "false", "--exit-on-error", "false", "--log-verbose", "0"]
        if install.backends is not None:
            version, libdir, site = _python_facts(install.python)
            backends = Path(self._tmp.name) / "backends"
            shutil.copytree(install.backends, backends, symlinks=True)
            shutil.copy2(install.stubs / version / "triton_python_backend_stub", backends / "python")
            command += ["--backend-directory", str(backends)]
            # The copied stub no longer finds pytriton's libraries through its RPATH.
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, str(install.libs),
                                                                   env.get("LD_LIBRARY_PATH")]))
            env["PYTHONPATH"] = site
            # The embedded interpreter must not wander into the caller's virtual environment
            # (numpy 2 there, the stub is built for numpy 1).
            env.pop("VIRTUAL_ENV", None)
            env["PATH"] = os.pathsep.join([str(install.python.parent), env.get("PATH", "")])
        self.log_path = log_path or Path(self._tmp.name) / "tritonserver.log"
        self._log = self.log_path.open("w")
        # Its own session: a terminal's Ctrl-C reaches this process only, which stops the server.
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=preexec_steps(die_with_parent(),
                                                                 pin_to(self.cpus) if self.cpus else None))
        self.url = f"127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self._wait_ready(startup_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the server says it is ready and its metrics endpoint answers (both start apart)."""
        deadline = time.monotonic() + timeout_s
        waiting = [f"http://{self.url}/v2/health/ready", self.metrics_url]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"tritonserver exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(waiting[0], timeout=1) as response:
                    if response.status == 200:
                        waiting.pop(0)
                        if not waiting:
                            return
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BackendError(f"tritonserver was not ready within {timeout_s:.0f} s ({waiting[0]} did not "
                           f"answer): {self.log_tail()}")

    def model_ready(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/models/{name}/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.flush()
        path = getattr(self, "log_path", None)
        return path.read_text(errors="replace")[-chars:] if path is not None and path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, SIGKILL after ``timeout_s``; the exit code (None if it never started). Idempotent."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            # The server leads its own process group; its Python backend stubs outlive a server
            # that was killed (SIGKILL) and would be orphans: end whatever is left of the group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
        self._tmp.cleanup()
        return None if process is None else process.returncode


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
