"""A sandbox for model-written code: Linux namespaces, an unprivileged uid and resource limits around a subprocess.

`run_sandboxed(candidate, tests, config)` runs `candidate` and then `tests` (Python source) inside the sandbox and
reports a `SandboxResult`. The candidate passes only if the judge process reports that the tests finished, over a
pipe the candidate's process never holds: a candidate that calls `sys.exit(0)`/`os._exit(0)` early, or prints
"passed", does not pass. `run_many` runs several jobs in parallel with a bounded number of workers; a reward call
abandoned by its guard (rewards/guard.py) cancels the sandboxes it started and starts no more.

What is guaranteed, by level (`SandboxResult.isolation` lists what a run actually got):

- Full (root with CAP_SYS_ADMIN, or a user allowed unprivileged user namespaces), required by default:
  * file system: the child pivots into a fresh root made of a read-only tmpfs and read-only binds of /usr, /lib*,
    /bin, /sbin and the Python installation; /sandbox is a size-capped tmpfs and the only writable place; nothing else
    of the host (/tmp, /root, /home, the repository) is visible, so writing, reading or deleting outside fails;
  * network: an empty network namespace (loopback down), so every connection fails, 127.0.0.1 included;
  * processes: PID namespace whose PID 1 is the candidate; it sees no process outside, and when it exits or is
    killed the kernel kills everything it spawned (fork bombs, daemons, setsid escapes);
  * identity: as root it switches to a fresh uid per run (never 0, not shared with other runs, so RLIMIT_NPROC
    counts only this run's processes); in a user namespace (callers who are not root, or root without
    CAP_SYS_ADMIN) it keeps the caller's uid with every capability dropped; no_new_privs blocks setuid binaries;
  * limits: RLIMIT_CPU, RLIMIT_AS (memory, per process: a run can hold at most max_procs x memory_mb; no cgroups),
    RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps; wall-time limit and output cap enforced by this
    process, which kills the whole namespace; if this process dies, its sandboxes die with it (PDEATHSIG);
  * environment: a minimal, fixed env (no secrets from the caller), stdin closed, no inherited descriptors.
- Degraded (`require_isolation=False` where namespaces are unavailable): the same limits, env scrubbing, closed
  stdin, own session (killed as a group, plus every process of the run's uid when root) and, as root, the fresh uid,
  which keeps the child away from root-owned files and processes but not from world-writable places such as /tmp.
  Without root and namespaces only the limits and the Python-level guards apply: not a security boundary.

In every mode the Python-level guards (os.fork, subprocess, socket, os.kill... raising PermissionError) are defence
in depth only; the tests of this module run the hostile snippets with and without them.

Where the verdict comes from (see _sandbox_child.py): the candidate runs in its own process; the tests run in a
second, non-dumpable process (the judge) that alone holds the report pipe, after the optional `trusted` source
(e.g. a HumanEval prompt's imports and helpers, which the candidate cannot replace). The tests see each function
the candidate defines (and each name in `entry_points`) as a proxy: arguments go to the candidate's process and
the result comes back as a plain value (exact builtin types only: None, bool, int, float, complex, str, bytes and
lists, tuples, dicts, sets of them), rebuilt from fresh objects in the judge. So an object whose __eq__ always
returns True, or an int subclass, is refused before any comparison; the expected values never enter the
candidate's process; and printing markers, exiting early, walking frames or searching the interpreter's memory
finds nothing that counts. A consequence: tests call candidate functions by value (in-place changes to arguments
are not seen, callables cannot be passed), which is how HumanEval's tests use them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_FULL_ISOLATION = ("pid_namespace", "network_namespace", "private_root_fs", "no_new_privs")
_STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "error")

# Fresh uids for runs started by root: one block of 1000 per parent process, one uid per run.
_UID_BASE = 1_600_000_000
_uid_lock = threading.Lock()
_uid_counter = 0


# --- cancellation: a reward call abandoned by its guard (guard.py) stops the sandboxes it started ------------------
# The guard runs each reward call in a thread inside `cancel_scope(token)`; run_sandboxed reads `current_token()`
# and, once it is cancelled, kills its processes within one poll interval and starts no new ones. run_many's pool
# threads inherit the token through contextvars.copy_context(). (Here rather than in a module of its own so that
# this file keeps importing nothing but the standard library.)

class CancelToken:
    """Set once; read from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask every piece of work started under this token to stop."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("posttrain_cancel", default=None)


def current_token() -> CancelToken | None:
    """The token of the reward call running in this context, if any."""
    return _current.get()


@contextlib.contextmanager
def cancel_scope(token: CancelToken) -> Iterator[CancelToken]:
    """Run the body with `token` as the current token (in this thread's context)."""
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and policy for one sandboxed run. Sizes in MiB, times in seconds."""

    timeout_s: float = 5.0  # wall time, measured by the parent from spawn to exit
    cpu_s: float | None = None  # RLIMIT_CPU; None = ceil(timeout_s)
    memory_mb: int = 512  # RLIMIT_AS of every process in the sandbox
    max_procs: int = 8  # RLIMIT_NPROC: processes and threads of the run's uid
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the child may write
    workdir_mb: int = 64  # size of the /sandbox tmpfs (the working folder)
    open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # stdout + stderr; more kills the run (status "output_limit")
    tail_bytes: int = 4000  # how much of the end of stdout/stderr the result keeps
    python_guards: bool = True  # patch os.fork/subprocess/socket/os.kill in the child (defence in depth)
    require_isolation: bool = True  # refuse to run (status "error") without namespaces + private root
    use_namespaces: bool = True  # False forces the degraded mode (for machines where unshare misbehaves, and tests)
    uid: int | None = None  # as root: the uid to run as; None = a fresh uid per run
    extra_ro_paths: tuple[str, ...] = ()  # more host paths to expose read-only (e.g. a data folder)
    site_packages: bool = False  # expose the current environment's site-packages (numpy...) to the candidate


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of _STATUSES
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    isolation: tuple[str, ...]  # protections the run actually had
    error: str = ""  # set when the sandbox itself failed (status "error")


def _fresh_uid() -> int:
    global _uid_counter
    with _uid_lock:
        _uid_counter += 1
        return _UID_BASE + (os.getpid() % 100_000) * 1000 + _uid_counter % 1000


def _ro_paths(config: SandboxConfig) -> list[str]:
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/localtime",
             sys.base_prefix]
    if config.site_packages:
        paths += [sys.prefix] + [p for p in sys.path if p.endswith("site-packages")]
    return paths + list(config.extra_ro_paths)


def _child_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/sandbox", "TMPDIR": "/sandbox", "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


class _Tail:
    """Keeps the total byte count and the last `keep` bytes of a stream."""

    def __init__(self, keep: int):
        self.keep, self.total, self.data = keep, 0, bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > 2 * self.keep:
            del self.data[: len(self.data) - self.keep]

    def text(self) -> str:
        return bytes(self.data[-self.keep:]).decode("utf-8", "replace")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (root only; used when there is no PID namespace)."""
    for _ in range(10):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = f.read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
                found = True
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def run_sandboxed(candidate: str, tests: str = "", config: SandboxConfig | None = None, *, trusted: str = "",
                  entry_points: Sequence[str] = ()) -> SandboxResult:
    """Run `candidate` then `tests` (Python source) in a fresh sandbox; see the module docstring for guarantees.

    trusted: source the judge runs before the tests (imports, helpers the tests call); its names stay the judge's.
    entry_points: names the tests must reach in the candidate even where `trusted` defines them (a stub's function).
    Every other function the candidate defines is reachable too, unless `trusted` or the builtins define the name.
    """
    config = config or SandboxConfig()
    if config.uid == 0:
        raise ValueError("SandboxConfig.uid must not be 0: the sandbox drops root, it does not run code as root")
    start = time.monotonic()
    token = current_token()
    if token is not None and token.cancelled:
        return SandboxResult(False, "error", None, "", "", 0.0, (), "cancelled: the reward call was abandoned")
    is_root = os.geteuid() == 0
    uid = (config.uid if config.uid is not None else _fresh_uid()) if is_root else None
    # Two parts: the launcher reads the first; the second (tests, trusted source) stays in the pipe until the judge
    # reads it after forking the candidate's process, so the expected values never exist in that process's memory.
    judged = {"tests": tests, "trusted": trusted, "entry_points": list(entry_points)}
    job = {
        "candidate": candidate,
        "namespaces": config.use_namespaces,
        "uid": uid,
        "python_guards": config.python_guards,
        "required": list(_FULL_ISOLATION) if config.require_isolation else [],
        "ro_paths": _ro_paths(config),
        "limits": {
            "cpu_s": max(1, math.ceil(config.cpu_s if config.cpu_s is not None else config.timeout_s)),
            "memory_bytes": config.memory_mb << 20,
            "file_bytes": config.max_file_mb << 20,
            "workdir_bytes": config.workdir_mb << 20,
            "max_procs": config.max_procs + 1,  # the judge is a process of the same uid
            "open_files": config.open_files,
        },
    }
    mountpoint = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    if uid is not None:
        os.chown(mountpoint, uid, uid)  # the working folder when namespaces are unavailable
    job["mountpoint"] = mountpoint
    first = json.dumps(job).encode()
    payload = b"%d\n" % len(first) + first + json.dumps(judged).encode()
    config_r, config_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", *([] if config.site_packages else ["-S"]), _CHILD,
             str(config_r), str(report_w), str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(config_r, report_w), env=_child_env(), cwd="/", start_new_session=True, close_fds=True,
        )
    except OSError as e:
        for fd in (config_r, config_w, report_r, report_w):
            os.close(fd)
        shutil.rmtree(mountpoint, ignore_errors=True)
        return SandboxResult(False, "error", None, "", "", time.monotonic() - start, (), f"cannot start: {e}")
    os.close(config_r)
    os.close(report_w)
    try:
        return _supervise(proc, config, payload, config_w, report_r, uid, start, token)
    finally:
        shutil.rmtree(mountpoint, ignore_errors=True)


def _pump(proc, sel, payload, config_w, stdout, stderr, deadline, max_output,
          token: CancelToken | None) -> tuple[bool, bool]:
    """Feed the job, collect output until the launcher exits; returns (timed_out, output_exceeded). A cancelled
    token ends the run like a timeout."""
    sent, exited_at = 0, None
    while True:
        now = time.monotonic()
        if token is not None and token.cancelled:
            return True, False
        if proc.poll() is not None:
            if not any(key.data != "config" for key in sel.get_map().values()):
                return False, False
            exited_at = exited_at or now
            if now - exited_at > 0.5:
                return False, False  # launcher gone but something (only without a PID namespace) holds the pipes
        if now >= deadline:
            return True, False
        for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
            if key.data == "config":
                try:
                    sent += os.write(config_w, payload[sent: sent + (1 << 16)])
                except BrokenPipeError:
                    sent = len(payload)
                if sent >= len(payload):
                    sel.unregister(config_w)
                    os.close(config_w)
                continue
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
            elif isinstance(key.data, bytearray):
                key.data.extend(chunk)
            else:
                key.data.add(chunk)
        if stdout.total + stderr.total > max_output:
            return False, True


def _supervise(proc, config, payload, config_w, report_r, uid, start, token) -> SandboxResult:
    stdout, stderr, report = _Tail(config.tail_bytes), _Tail(config.tail_bytes), bytearray()
    sel = selectors.DefaultSelector()
    os.set_blocking(config_w, False)
    sel.register(config_w, selectors.EVENT_WRITE, "config")
    sel.register(proc.stdout, selectors.EVENT_READ, stdout)
    sel.register(proc.stderr, selectors.EVENT_READ, stderr)
    sel.register(report_r, selectors.EVENT_READ, report)
    reports: dict = {}
    try:
        timed_out, too_much = _pump(proc, sel, payload, config_w, stdout, stderr, start + config.timeout_s,
                                    config.max_output_bytes, token)
    finally:  # also on KeyboardInterrupt: never leave a sandbox running
        os.set_blocking(report_r, False)
        try:
            while chunk := os.read(report_r, 1 << 16):  # what the loop has not read yet (the child's PID)
                report.extend(chunk)
        except BlockingIOError:
            pass
        for line in bytes(report).decode("utf-8", "replace").splitlines():
            try:
                reports.update(json.loads(line))
            except json.JSONDecodeError:
                pass
        _kill_all(proc, reports.get("child_pid"), uid, reports.get("namespaces"))
        returncode = proc.wait()
        if any(key.data == "config" for key in sel.get_map().values()):
            os.close(config_w)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        os.close(report_r)
    duration = time.monotonic() - start
    protections = tuple(reports.get("protections", ()))
    out, err = stdout.text(), stderr.text()
    verdict_passed = reports.get("verdict") == "passed"  # written only by the judge, on a pipe only it holds

    if reports.get("setup") != "ok":
        error = reports.get("error") or f"sandbox setup did not finish (exit {returncode}): {err[-500:]}"
        if timed_out:
            error = "sandbox setup timed out"
        if token is not None and token.cancelled:
            error = "cancelled: the reward call was abandoned"
        return SandboxResult(False, "error", returncode, out, err, duration, protections, error)
    if token is not None and token.cancelled and not verdict_passed:
        return SandboxResult(False, "error", returncode, out, err, duration, protections,
                             "cancelled: the reward call was abandoned")
    if too_much:
        status = "output_limit"
    elif timed_out:
        status = "timeout"
    elif verdict_passed:
        status = "passed"
    elif reports.get("candidate_signal") in (signal.SIGXCPU, signal.SIGKILL):
        status = "timeout"  # RLIMIT_CPU (soft = hard) kills with SIGKILL; SIGXCPU where a process handles it
    elif "MemoryError" in err:
        status = "memory"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, returncode, out, err, duration, protections)


def _kill_all(proc: subprocess.Popen, child_pid: int | None, uid: int | None, namespaces: str | None) -> None:
    """Kill the launcher's group and the sandbox's PID 1 (which takes its whole PID namespace with it)."""
    if proc.poll() is None:
        # Unreaped, so the launcher still holds the child's PID and the group id: neither can have been reused.
        if child_pid:
            try:
                os.kill(child_pid, signal.SIGKILL)
                if not namespaces:
                    os.killpg(child_pid, signal.SIGKILL)  # the child leads its own session: its group goes too
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=2.0)  # the launcher reaps the child; killing it too would leave a zombie for init
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    if not namespaces and uid is not None:
        _kill_uid(uid)  # no PID namespace: processes that called setsid() escaped the group kill


def run_many(
    jobs: Sequence[tuple[str, str] | tuple[str, str, str, Sequence[str]]], config: SandboxConfig | None = None, *,
    max_workers: int | None = None,
) -> list[SandboxResult]:
    """Run (candidate, tests) or (candidate, tests, trusted, entry_points) jobs in parallel, at most `max_workers`
    at a time (default: 2 per CPU, at most 8). Under a cancelled token (cancel_scope) the rest return at once."""
    if not jobs:
        return []

    def one(job) -> SandboxResult:
        candidate, tests, *rest = job
        trusted, entry_points = (rest[0], rest[1]) if rest else ("", ())
        return run_sandboxed(candidate, tests, config, trusted=trusted, entry_points=entry_points)

    workers = max_workers or min(8, 2 * (os.cpu_count() or 1))  # runs mostly wait on process start-up
    if workers == 1 or len(jobs) == 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="sandbox") as pool:
        # each job runs in a copy of the caller's context, so the pool's threads see the caller's cancel token
        futures = [pool.submit(contextvars.copy_context().run, one, job) for job in jobs]
        return [f.result() for f in futures]


def isolation_report(config: SandboxConfig | None = None) -> SandboxResult:
    """Run an empty program with `require_isolation=False` and report which protections this machine provides."""
    base = config or SandboxConfig()
    return run_sandboxed("", "", dataclasses.replace(base, require_isolation=False))
