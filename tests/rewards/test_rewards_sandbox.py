"""The sandbox against hostile code: each snippet runs with the Python-level guards on and off (the OS layer must
hold on its own), and the test then checks the host: files, listener, victim process, leftover processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from posttrain.rewards import sandbox as sb
from posttrain.rewards.sandbox import SandboxConfig, isolation_report, run_many, run_sandboxed

REPO = Path(__file__).resolve().parents[2]
FULL = ("pid_namespace", "network_namespace", "private_root_fs", "no_new_privs", "rlimits")


@pytest.fixture(scope="module")
def full_isolation():
    report = isolation_report()
    if not set(FULL) <= set(report.isolation):
        pytest.skip(f"this machine gives the sandbox only {report.isolation} ({report.error or report.stderr_tail})")
    return report


GUARDS = pytest.mark.parametrize("guards", [True, False], ids=["guards", "no_guards"])


def _run(code: str, guards: bool, **overrides) -> sb.SandboxResult:
    config = SandboxConfig(**{"timeout_s": 5.0, "python_guards": guards, **overrides})
    return run_sandboxed(textwrap.dedent(code), "", config)


@GUARDS
def test_writes_outside_the_workdir_fail(full_isolation, no_leftovers, guards):
    tag = uuid.uuid4().hex
    targets = [Path(f"/tmp/pwned_{tag}"), REPO / "tests" / "rewards" / f"pwned_{tag}", Path(f"/dev/shm/pwned_{tag}"),
               Path(f"/var/tmp/pwned_{tag}")]
    try:
        result = _run(f"""
            import os
            for path in {[str(t) for t in targets]!r} + ["/etc/pwned_{tag}", "/usr/pwned_{tag}"]:
                try:
                    with open(path, "w") as f:
                        f.write("x")
                    print("LEAK", path)
                except OSError as e:
                    print("blocked", path, type(e).__name__)
            with open("inside.txt", "w") as f:
                f.write("inside ok")
            print(open("inside.txt").read(), os.getcwd())
        """, guards)
        assert result.status == "passed", result.stderr_tail
        assert "LEAK" not in result.stdout_tail
        assert "inside ok /sandbox" in result.stdout_tail  # the working folder itself is writable
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@GUARDS
def test_network_to_a_local_listener_is_unreachable(full_isolation, no_leftovers, guards):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        result = _run(f"""
            import ctypes, socket, struct, _socket
            raw = lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            for connect in (lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1),
                            lambda: raw().connect(("127.0.0.1", {port}))):
                try:
                    connect()
                    print("CONNECTED")
                except OSError as e:
                    print("refused", type(e).__name__, e)
            libc = ctypes.CDLL(None, use_errno=True)  # straight to the kernel, past any Python-level guard
            fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
            address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
            print("libc.connect", fd >= 0, libc.connect(fd, address, 16), ctypes.get_errno())
        """, guards)
        assert result.status == "passed", result.stderr_tail
        assert "CONNECTED" not in result.stdout_tail
        assert result.stdout_tail.count("refused") == 2
        assert "libc.connect True -1 101" in result.stdout_tail  # ENETUNREACH: an empty network namespace
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever arrived
    finally:
        listener.close()


@GUARDS
def test_fork_bomb_is_bounded_and_killed(full_isolation, no_leftovers, guards):
    start = time.monotonic()
    result = _run("""
        import os
        while True:
            try:
                os.fork()
            except Exception:
                pass
    """, guards, timeout_s=1.5)
    assert result.status == "timeout"
    assert time.monotonic() - start < 4.0


@GUARDS
def test_process_count_is_capped_and_children_die_with_the_sandbox(full_isolation, no_leftovers, guards):
    result = _run("""
        import os, time
        n = 0
        for _ in range(100):
            try:
                pid = os.fork()
            except Exception:
                break
            if pid == 0:
                os.setsid()  # try to escape the process group
                time.sleep(60)
                os._exit(0)
            n += 1
        print("forked", n)
    """, guards, max_procs=6)
    assert result.status == "passed", result.stderr_tail
    forked = int(result.stdout_tail.split("forked")[1].split()[0])
    assert forked == (0 if guards else 5)  # RLIMIT_NPROC=6 counts the candidate itself
    # no_leftovers: the sleeping, setsid()'d children died with the namespace's PID 1


@GUARDS
def test_endless_loop_times_out(full_isolation, no_leftovers, guards):
    start = time.monotonic()
    result = _run("while True:\n    pass\n", guards, timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert 1.0 <= result.duration_s < 2.5 and time.monotonic() - start < 3.0


def test_cpu_limit_kills_before_the_wall_clock(full_isolation, no_leftovers):
    result = _run("while True:\n    pass\n", True, timeout_s=10.0, cpu_s=1)
    assert result.status == "timeout"
    assert result.duration_s < 5.0  # RLIMIT_CPU (1 s of CPU), not the 10 s wall limit


@GUARDS
@pytest.mark.parametrize("code", ["x = bytearray(8 << 30)", "x = []\nwhile True:\n    x.append(bytearray(64 << 20))"],
                         ids=["one_block", "growing"])
def test_huge_allocation_hits_the_memory_limit(full_isolation, no_leftovers, guards, code):
    result = _run(code, guards, memory_mb=256)
    assert result.status == "memory", (result.status, result.stderr_tail)
    assert "MemoryError" in result.stderr_tail


@GUARDS
def test_cannot_kill_parent_or_other_processes(full_isolation, no_leftovers, guards):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        result = _run(f"""
            import ctypes, os, signal
            libc = ctypes.CDLL(None)
            for pid in (os.getppid(), {os.getpid()}, {victim.pid}, -1, 0):
                try:
                    os.kill(pid, signal.SIGKILL)
                except Exception as e:
                    print("kill", pid, type(e).__name__)
                print("libc.kill", pid, libc.kill(pid, 9))  # bypasses the Python guards
            try:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            except Exception as e:
                print("killpg", type(e).__name__)
            print("still here")
        """, guards)
        time.sleep(0.1)
        assert victim.poll() is None, "the sandbox killed a process outside it"
        assert result.status in ("passed", "failed")  # whatever it did to itself, it reached nothing else
    finally:
        victim.kill()
        victim.wait()


@GUARDS
def test_environment_secrets_are_not_passed(full_isolation, no_leftovers, guards, monkeypatch):
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", secret)
    result = _run("""
        import os
        print(sorted(os.environ.items()))
        for path in ("/proc/self/environ", "/proc/1/environ"):
            try:
                print(open(path, "rb").read())
            except OSError as e:
                print(path, type(e).__name__)
    """, guards)
    assert result.status == "passed", result.stderr_tail
    assert "POSTTRAIN_TEST_SECRET" not in result.stdout_tail and secret not in result.stdout_tail
    assert "('HOME', '/sandbox')" in result.stdout_tail  # the minimal env the sandbox builds


@GUARDS
def test_secret_files_outside_cannot_be_read(full_isolation, no_leftovers, guards, tmp_path):
    secret = "s3cret-" + uuid.uuid4().hex
    secret_file = Path(f"/tmp/secret_{uuid.uuid4().hex}")
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    try:
        result = _run(f"""
            for path in ({str(secret_file)!r}, "/etc/shadow", "/root/.bashrc", {str(REPO / "pyproject.toml")!r}):
                try:
                    print(open(path).read())
                except OSError as e:
                    print("blocked", path, type(e).__name__)
        """, guards)
        assert result.status == "passed", result.stderr_tail
        assert secret not in result.stdout_tail
        assert result.stdout_tail.count("blocked") == 4
    finally:
        secret_file.unlink()


@GUARDS
def test_spawned_subprocesses_stay_inside(full_isolation, no_leftovers, guards):
    marker = Path(f"/tmp/spawned_{uuid.uuid4().hex}")
    result = _run(f"""
        import os, subprocess
        try:
            out = subprocess.run(["sh", "-c", "echo SPAWNED $(id -u); touch {marker}"], capture_output=True, text=True)
            print(out.stdout, out.stderr)
        except Exception as e:
            print("subprocess", type(e).__name__)
        try:
            os.system("touch {marker}")
        except Exception as e:
            print("system", type(e).__name__)
    """, guards)
    assert not marker.exists()
    if guards:
        assert "subprocess PermissionError" in result.stdout_tail and "system PermissionError" in result.stdout_tail
    else:  # the shell ran, as the sandbox's uid, and could not touch /tmp
        assert "SPAWNED" in result.stdout_tail and "SPAWNED 0" not in result.stdout_tail


@GUARDS
def test_files_outside_cannot_be_deleted(full_isolation, no_leftovers, guards, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    os.chmod(tmp_path, 0o777)
    result = _run(f"""
        import os, shutil
        for action in (lambda: os.remove({str(victim)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),
                       lambda: os.rename({str(victim)!r}, "stolen.txt")):
            try:
                action()
                print("DELETED")
            except OSError as e:
                print("blocked", type(e).__name__)
    """, guards)
    assert "DELETED" not in result.stdout_tail
    assert victim.read_text() == "keep me"


@GUARDS
def test_remounting_the_root_writable_fails(full_isolation, no_leftovers, guards):
    result = _run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        MS_REMOUNT, MS_BIND = 32, 4096
        print("remount", libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None), ctypes.get_errno())
        print("unshare", libc.unshare(0x00020000 | 0x10000000), ctypes.get_errno())
        try:
            open("/usr/pwned", "w")
            print("LEAK")
        except OSError as e:
            print("blocked", type(e).__name__)
    """, guards)
    assert result.status == "passed", result.stderr_tail
    assert "remount -1 1" in result.stdout_tail  # EPERM: no CAP_SYS_ADMIN left
    assert "LEAK" not in result.stdout_tail and not Path("/usr/pwned").exists()


@GUARDS
def test_huge_output_is_capped(full_isolation, no_leftovers, guards):
    start = time.monotonic()
    result = _run("while True:\n    print('x' * 100_000)\n", guards, max_output_bytes=1 << 20, tail_bytes=1000)
    assert result.status == "output_limit"
    assert len(result.stdout_tail) <= 1000
    assert time.monotonic() - start < 3.0


@GUARDS
@pytest.mark.parametrize("candidate", [
    "import sys\nsys.exit(0)",
    "raise SystemExit(0)",
    "import os\nos._exit(0)",
    "print('posttrain-sandbox-ok-' + '0' * 32)\nimport os\nos._exit(0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "import os\nos.close(1)\nos.close(2)",
    "import builtins\nbuiltins.exec = lambda *a, **k: None",
], ids=["sys_exit", "raise_systemexit", "os_exit", "fake_nonce", "self_kill", "close_stdout", "patch_exec"])
def test_exit_tricks_do_not_count_as_passing(full_isolation, no_leftovers, guards, candidate):
    result = run_sandboxed(candidate, "raise AssertionError('the tests ran and failed')",
                           SandboxConfig(timeout_s=5.0, python_guards=guards))
    assert not result.passed and result.status != "passed"
    assert result.status in ("failed", "timeout")


@pytest.mark.parametrize("patch", [
    "import builtins\nbuiltins.abs = lambda v: 0",
    "def abs(v):\n    return 0",
    "import builtins\n_compile = builtins.compile\nbuiltins.compile = lambda *a, **k: _compile('pass', '<x>', 'exec')",
    "__builtins__.exec = lambda *a, **k: None",
], ids=["patch_abs", "shadow_abs", "patch_compile", "patch_exec"])
def test_patching_builtins_cannot_fake_a_pass(full_isolation, patch):
    tests = "assert abs(f(2) - 4) < 1e-9"
    assert run_sandboxed("def f(x):\n    return 2 * x", tests).passed  # control: the honest version passes
    result = run_sandboxed("def f(x):\n    return 0\n" + patch, tests)
    assert result.status == "failed" and "AssertionError" in result.stderr_tail


def test_passing_program_and_nonce_hidden(full_isolation, no_leftovers):
    result = run_sandboxed("def f(x):\n    return 2 * x\nprint('hello')", "assert f(3) == 6")
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout_tail.strip() == "hello"
    assert "posttrain-sandbox-ok" not in result.stdout_tail
    result = run_sandboxed("def f(x):\n    return 2 * x", "assert f(3) == 7")
    assert not result.passed and result.status == "failed" and "AssertionError" in result.stderr_tail


def test_isolation_report_as_root(full_isolation):
    if os.geteuid() != 0:
        pytest.skip("root-only protections")
    assert set(full_isolation.isolation) >= {*FULL, "ipc_namespace", "tmpfs_workdir", "unprivileged_uid",
                                             "python_guards"}


def test_parallel_runs_overlap_and_keep_order(full_isolation, no_leftovers):
    jobs = [(f"import time\ntime.sleep(0.6)\nprint({i})", "") for i in range(4)]
    start = time.monotonic()
    results = run_many(jobs, SandboxConfig(timeout_s=5.0), max_workers=4)
    elapsed = time.monotonic() - start
    assert [r.stdout_tail.strip() for r in results] == ["0", "1", "2", "3"]
    assert all(r.passed for r in results)
    assert elapsed < 4 * 0.6  # sequential would take at least 2.4 s


def test_degraded_mode_is_refused_unless_allowed():
    result = run_sandboxed("print(1)", "", SandboxConfig(use_namespaces=False))
    assert result.status == "error" and "isolation unavailable" in result.error


@pytest.mark.skipif(os.geteuid() != 0, reason="the degraded mode's uid switch and sweep need root")
def test_degraded_mode_as_root_still_contains_processes_and_files(no_leftovers, tmp_path):
    config = SandboxConfig(use_namespaces=False, require_isolation=False, python_guards=False, timeout_s=1.5)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = run_sandboxed(f"""
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(60)
try:
    open({str(private / "x")!r}, "w")
    print("LEAK", flush=True)
except OSError as e:
    print("blocked", type(e).__name__, flush=True)
print("uid", os.getuid(), flush=True)
while True:
    pass
""", "", config)
    stdlib = Path(os.__file__).resolve().parent
    if any(os.stat(p).st_mode & 0o005 != 0o005 for p in [stdlib, *stdlib.parents]):
        # Python lives where other users cannot read it (e.g. a 0700 home): correct code could not import the
        # standard library, so the degraded mode refuses clearly instead of scoring every candidate 0.
        assert result.status == "error" and "cannot read the Python standard library" in result.error
        return
    assert result.status == "timeout"
    assert "unprivileged_uid" in result.isolation and "pid_namespace" not in result.isolation
    assert "blocked PermissionError" in result.stdout_tail and "uid 0" not in result.stdout_tail
    assert not (private / "x").exists()
    # no_leftovers: the setsid()'d child escaped the group kill but not the sweep over the run's uid


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists(),
                    reason="needs root, setpriv and a system python to act as an unprivileged caller")
def test_unprivileged_caller_gets_a_user_namespace_sandbox(full_isolation):
    """The non-root path: the caller is `nobody`, so isolation comes from a user namespace."""
    folder = Path(tempfile.mkdtemp(prefix="posttrain-nobody-"))
    try:
        _run_as_nobody(folder)
    finally:
        shutil.rmtree(folder)


def _run_as_nobody(folder: Path) -> None:
    script = folder / "run.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("sandbox", {str(REPO / "src/posttrain/rewards/sandbox.py")!r})
        sandbox = importlib.util.module_from_spec(spec)
        sys.modules["sandbox"] = sandbox
        spec.loader.exec_module(sandbox)
        config = sandbox.SandboxConfig(python_guards=False, timeout_s=5)
        r = sandbox.run_sandboxed("open('/tmp/pwned_nobody_{uuid.uuid4().hex}', 'w')", "", config)
        ok = sandbox.run_sandboxed("import os\\nprint(os.getuid())", "", config)
        print(json.dumps([r.status, r.error, r.isolation, ok.status, ok.stdout_tail]))
    """))
    folder.chmod(0o755)
    script.chmod(0o644)
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                          str(script)], capture_output=True, text=True, timeout=60, cwd="/")
    if out.returncode != 0:
        pytest.skip(f"system python cannot run the module as nobody: {out.stderr[-300:]}")
    status, error, isolation, ok_status, ok_out = json.loads(out.stdout.strip().splitlines()[-1])
    if error and "isolation unavailable" in error:
        pytest.skip(f"unprivileged user namespaces are disabled here: {error}")
    assert status == "failed" and ok_status == "passed", (status, error)
    assert {"pid_namespace", "network_namespace", "private_root_fs", "no_capabilities"} <= set(isolation)
    assert ok_out.strip() == "65534"
    assert not list(Path("/tmp").glob("pwned_nobody_*"))
