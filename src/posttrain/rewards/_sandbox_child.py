"""The process side of posttrain's code sandbox (see sandbox.py): isolates itself, then runs candidate + tests.

Run as `python -I -S _sandbox_child.py CONFIG_FD REPORT_FD CALLER_PID` by `sandbox.run_sandboxed`; it imports
nothing from posttrain (only the standard library), reads its job as JSON from CONFIG_FD, reports on REPORT_FD.

Two processes:
- the launcher (this script's first process) enters new mount, network, PID, IPC and UTS namespaces (as root
  directly; otherwise inside a new user namespace), forks, reports the child's PID and mirrors its exit status;
- the child is PID 1 of the new PID namespace. It builds a fresh root file system (a read-only tmpfs holding
  read-only binds of the system and Python directories, a size-capped tmpfs at /sandbox as the only writable place,
  its own /proc and a few /dev nodes), pivots into it, sets resource limits, drops to an unprivileged uid (or
  drops all capabilities inside the user namespace), sets no_new_privs, closes the report pipe and only then runs
  the untrusted code. When PID 1 exits or is killed, the kernel kills every process left in the namespace.
"""

import ctypes
import json
import os
import re
import resource
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
SIGKILL = 9
WORKDIR = "/sandbox"  # the only writable directory inside; host paths under it, /proc or /dev are not exposed
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} -> {target}")


def _report(fd, **fields):
    os.write(fd, (json.dumps(fields) + "\n").encode())


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _enter_namespaces():
    """Unshare namespaces in the launcher; return "root", "user", or None with the reason."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() == 0:
        if _libc.unshare(flags) == 0:
            return "root", ""
        reason = f"unshare as root: {os.strerror(ctypes.get_errno())}; "
    else:
        reason = ""
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(flags | CLONE_NEWUSER) != 0:
        return None, reason + f"unshare(user): {os.strerror(ctypes.get_errno())}"
    # Map our own uid/gid to themselves (a process can map only its own ids into a namespace it just entered);
    # all capabilities are dropped after setup. For root without CAP_SYS_ADMIN this means uid 0 without capabilities.
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")
    return "user", ""


def _locked_flags(path):
    """Mount flags of the mount holding `path` that a remount must keep (required inside a user namespace)."""
    f_flag = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME), (2048, MS_NODIRATIME),
                   (4096, MS_RELATIME)):
        if f_flag & st:
            flags |= ms
    return flags


def _bind_readonly(source, root):
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND | MS_REC)
    # A bind remount changes one mount: make the bind and every mount below it (e.g. /usr/local) read-only.
    with open("/proc/self/mountinfo") as f:
        mountpoints = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
    for point in [target] + sorted(p for p in mountpoints if p.startswith(target + "/")):
        _mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | _locked_flags(point))


def _build_root(cfg, uid, gid):
    """Assemble the new root inside cfg["mountpoint"] and pivot into it; /sandbox is the only writable directory."""
    root = cfg["mountpoint"].rstrip("/")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    covered = []
    for path in cfg["ro_paths"]:
        if path.startswith((WORKDIR, "/proc", "/dev")) or path in ("", "/"):
            raise ValueError(f"cannot expose {path!r} inside the sandbox")
        if any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered):
            continue
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), root + path)  # e.g. /lib -> usr/lib on merged-/usr systems
            continue
        if not os.path.exists(path):
            continue
        _bind_readonly(path, root)
        covered.append(path)
    os.mkdir(root + "/dev")
    for node in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + node):
            open(f"{root}/dev/{node}", "a").close()
            _mount("/dev/" + node, f"{root}/dev/{node}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(root + WORKDIR)
    _mount("tmpfs", root + WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['limits']['workdir_bytes']},nr_inodes=4096,mode=0700,uid={uid},gid={gid}")
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is not None:
        # pivot_root(".", "."): the old root ends up stacked on the new one and is detached right away.
        _check(_libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    else:
        os.chroot(".")  # no pivot_root number for this machine; capabilities are dropped below, so no escape
    os.chdir("/")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(WORKDIR)


def _set_limits(limits):
    cpu = int(limits["cpu_s"])
    for name, soft, hard in (
        ("RLIMIT_CPU", cpu, cpu),  # hard = soft: SIGKILL right away (PID 1 of a namespace ignores SIGXCPU)
        ("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["file_bytes"], limits["file_bytes"]),
        ("RLIMIT_NPROC", limits["max_procs"], limits["max_procs"]),
        ("RLIMIT_NOFILE", limits["open_files"], limits["open_files"]),
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_MEMLOCK", 0, 0),
        ("RLIMIT_MSGQUEUE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_all_capabilities():
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _python_guards():
    """Defence in depth only: plain Python code gets a clear PermissionError; ctypes can still reach the kernel,
    which is why the namespaces, uid and limits above are what actually contain the code."""
    import _posixsubprocess
    import _socket

    def denied(*args, **kwargs):
        raise PermissionError("disabled in the posttrain sandbox")

    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "posix_spawn", "posix_spawnp", "execv",
                 "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, denied)
    _posixsubprocess.fork_exec = denied  # what subprocess.Popen calls; patching the class would break subclasses

    class GuardedSocket(_socket.socket):
        # socket.socket subclasses _socket.socket and calls _socket.socket.__init__ by name, so replacing the name
        # guards the socket module whether it is imported before or after; AF_UNIX stays (per network namespace).
        __slots__ = ()  # socket.socket adds __weakref__ itself

        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != _socket.AF_UNIX:
                raise PermissionError("network sockets are disabled in the posttrain sandbox")
            super().__init__(family, type, proto, fileno)

    _socket.socket = _socket.SocketType = GuardedSocket


def _child(cfg, report_fd, ns_mode, ns_error):
    protections = []
    try:
        if cfg["python_guards"]:
            import _posixsubprocess  # noqa: F401 -- imported while the Python installation is surely readable
            import _socket  # noqa: F401
        os.setsid()  # our own session and group: a kill(0, ...) from the candidate never reaches the launcher
        switch_uid = os.geteuid() == 0 and cfg["uid"] is not None and ns_mode != "user"
        uid = cfg["uid"] if switch_uid else os.geteuid()
        gid = cfg["uid"] if switch_uid else os.getegid()
        if ns_mode:
            _build_root(cfg, uid, gid)
            protections += ["pid_namespace", "network_namespace", "ipc_namespace", "private_root_fs", "tmpfs_workdir"]
        else:
            os.chdir(cfg["mountpoint"])
        _set_limits(cfg["limits"])
        protections.append("rlimits")
        if switch_uid:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
            protections.append("unprivileged_uid")
        elif ns_mode == "user":
            _drop_all_capabilities()  # the caller's own uid, which held every capability inside the namespace
            protections.append("no_capabilities")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        protections.append("no_new_privs")
        # Die with the launcher (set after the uid change, which clears it); the launcher dies with the caller.
        _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl(pdeathsig)")
        missing = [p for p in cfg["required"] if p not in protections]
        if missing:
            _report(report_fd, setup="failed", protections=protections,
                    error=f"isolation unavailable ({ns_error or 'no namespaces'}); missing: {', '.join(missing)}")
            os._exit(1)
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 1 << 16)
        if cfg["python_guards"]:
            _python_guards()
            protections.append("python_guards")
    except BaseException as e:  # noqa: BLE001 -- any setup failure is reported, never ignored
        _report(report_fd, setup="failed", error=f"{type(e).__name__}: {e}", protections=protections)
        os._exit(1)
    _report(report_fd, setup="ok", protections=protections)
    os.close(report_fd)
    _run(cfg["candidate"], cfg["tests"], cfg["nonce"])


def _run(candidate, tests, nonce):
    """Run the candidate, then its tests; print the nonce only if both finished.

    Both sources are compiled before the candidate runs, and the tests run in a copy of the candidate's globals
    whose builtins are a snapshot taken before it ran, without candidate names that shadow builtins: redefining or
    patching abs/len/all/compile/exec cannot change what the tests check. Modules the tests import (math...) are
    shared with the candidate and could still be patched by it.
    """
    import builtins
    import linecache

    write, exit_, run = os.write, os._exit, exec  # bound now: the candidate may patch os and builtins
    format_exc = traceback.format_exc
    clean_builtins = dict(vars(builtins))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        for name, source in (("<candidate>", candidate), ("<tests>", tests)):
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        candidate_code, tests_code = compile(candidate, "<candidate>", "exec"), compile(tests, "<tests>", "exec")
        run(candidate_code, namespace)
        tests_namespace = {k: v for k, v in namespace.items() if k not in clean_builtins}
        tests_namespace.update(__name__="__main__", __builtins__=clean_builtins)
        run(tests_code, tests_namespace)
    except SystemExit as e:
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        write(2, f"SystemExit({e.code!r}) raised before the tests finished\n".encode())
        exit_(1)
    except BaseException:  # noqa: BLE001 -- the candidate's own failure: traceback to stderr
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        try:
            write(2, format_exc().encode("utf-8", "replace"))
        finally:
            exit_(1)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 -- the candidate may have closed or replaced sys.stdout
        pass
    write(1, f"\n{nonce}\n".encode())
    exit_(0)


def main():
    config_fd, report_fd, caller = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # a crashed caller takes its sandboxes with it
    if os.getppid() != caller:
        os._exit(1)  # the caller died before the line above
    cfg = json.loads(_read_all(config_fd))
    os.close(config_fd)
    ns_mode, ns_error = (None, "namespaces disabled")
    if cfg["namespaces"]:
        try:
            ns_mode, ns_error = _enter_namespaces()
        except OSError as e:
            ns_mode, ns_error = None, f"user namespace setup: {e}"
    pid = os.fork()
    if pid == 0:
        try:
            _child(cfg, report_fd, ns_mode, ns_error)
        finally:
            os._exit(1)
    _report(report_fd, child_pid=pid, namespaces=ns_mode, namespace_error=ns_error)
    os.close(report_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
