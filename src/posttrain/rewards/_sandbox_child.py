"""The process side of posttrain's code sandbox (see sandbox.py): isolates itself, then runs candidate + tests.

Run as `python -I -S _sandbox_child.py CONFIG_FD REPORT_FD CALLER_PID` by `sandbox.run_sandboxed`; it imports
nothing from posttrain (only the standard library), reads its job as JSON from CONFIG_FD, reports on REPORT_FD.

Three processes:
- the launcher (this script's first process) enters new mount, network, PID, IPC and UTS namespaces (as root
  directly; otherwise inside a new user namespace), forks, reports the child's PID and mirrors its exit status;
- the judge is PID 1 of the new PID namespace. It builds a fresh root file system (a read-only tmpfs holding
  read-only binds of the system and Python directories, a size-capped tmpfs at /sandbox as the only writable place,
  its own /proc and a few /dev nodes), pivots into it, sets resource limits, drops to an unprivileged uid (or
  drops all capabilities inside the user namespace), sets no_new_privs, makes itself non-dumpable and closes every
  descriptor but the report pipe. When PID 1 exits or is killed, the kernel kills every process in the namespace;
- the candidate's process, forked by the judge, closes the report pipe before any candidate code runs, runs the
  candidate's source and then answers calls: the judge runs the trusted source and the tests, and each call of a candidate function
  travels as plain values (encode_plain: exact builtin types only) over two pipes. The expected values, the
  comparison and the report pipe on which the judge writes `{"verdict": "passed"}` never exist in the candidate's
  process, and being non-dumpable keeps the judge's memory and descriptors out of its reach (no ptrace, no
  /proc/PID/mem or /proc/PID/fd), so neither printing, exiting, walking frames, searching memory, nor returning
  objects that compare equal to anything can forge a pass.
"""

import builtins
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
PR_SET_DUMPABLE = 4
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


def _read_exact(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            raise EOFError("job pipe closed early")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_header(fd):
    """The byte length of the job's first part, sent as ASCII digits and a newline (read byte by byte, so nothing
    of the second part, the tests, is read by this process)."""
    digits = b""
    while not digits.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte or len(digits) > 20:
            raise EOFError("malformed job header")
        digits += byte
    return int(digits)


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


def _child(cfg, report_fd, job_fd, ns_mode, ns_error):
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
        # Not dumpable: a process of the same uid (the candidate) can neither ptrace this one, read its memory,
        # nor open its descriptors through /proc/PID/fd; that is what keeps the verdict descriptor out of reach.
        _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(dumpable)")
        protections.append("judge_apart")
        missing = [p for p in cfg["required"] if p not in protections]
        if missing:
            _report(report_fd, setup="failed", protections=protections,
                    error=f"isolation unavailable ({ns_error or 'no namespaces'}); missing: {', '.join(missing)}")
            os._exit(1)
        if switch_uid and not ns_mode:
            _require_readable_stdlib(uid)
        low, high = sorted((report_fd, job_fd))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 16)
        if cfg["python_guards"]:
            protections.append("python_guards")  # installed in both processes right after the fork below
    except BaseException as e:  # noqa: BLE001 -- any setup failure is reported, never ignored
        _report(report_fd, setup="failed", error=f"{type(e).__name__}: {e}", protections=protections)
        os._exit(1)
    _report(report_fd, setup="ok", protections=protections)
    _judge(cfg, report_fd, job_fd)


def _require_readable_stdlib(uid):
    """Without a private root the fresh uid sees the host's files: refuse clearly if it cannot read the standard
    library (a Python installed under a 0700 home), where even `import math` would fail and correct code score 0."""
    stdlib = os.path.dirname(os.__file__)  # where this interpreter loaded `os` from: it exists
    for path in (stdlib, os.path.join(stdlib, "encodings")):
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(
                f"degraded mode (no namespaces): the sandbox's uid {uid} cannot read the Python standard library at "
                f"{path} (a folder above it is not readable by other users, e.g. a 0700 home), so correct code "
                "would fail to import modules. Enable namespaces (root with CAP_SYS_ADMIN or unprivileged user "
                "namespaces), or install Python in a folder every user can read.")


# --- plain values: the only things that cross between the candidate's process and the judge ----------------------

_MAX_DEPTH = 100
_MAX_ITEMS = 1_000_000
_PLAIN = "None, bool, int, float, complex, str, bytes, or lists, tuples, dicts, sets of them"


class NotPlain(TypeError):
    """A value that is not built only from the builtin types above (a subclass counts as not plain)."""


def encode_plain(value):
    """`value` as JSON-ready tagged lists, checking exact builtin types (`type(x) is int`, never isinstance), so an
    object with its own __eq__, or an int subclass, cannot pass. No method of `value` is called."""
    budget = [_MAX_ITEMS]

    def enc(x, depth):
        budget[0] -= 1
        if depth > _MAX_DEPTH or budget[0] < 0:
            raise NotPlain("value too deep or too large")
        t = type(x)
        if x is None:
            return ["N"]
        if t is bool:
            return ["b", x is True]
        if t is int:
            return ["i", int.__format__(x, "x")]  # hexadecimal: exact, no digit limit
        if t is float:
            return ["f", float.hex(x)]
        if t is complex:
            return ["c", float.hex(x.real), float.hex(x.imag)]
        if t is str:
            return ["s", x]
        if t is bytes:
            return ["y", bytes.hex(x)]
        if t is list or t is tuple:
            return ["l" if t is list else "t", [enc(v, depth + 1) for v in (list.copy(x) if t is list else x)]]
        if t is set or t is frozenset:
            return ["S" if t is set else "F", [enc(v, depth + 1) for v in list(x)]]
        if t is dict:
            return ["d", [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in list(dict.items(x))]]
        raise NotPlain(f"a {t.__name__!s} object is not a plain value ({_PLAIN})")

    return enc(value, 0)


def decode_plain(data):
    """The value `encode_plain` described, rebuilt from fresh builtin objects; anything malformed raises NotPlain."""
    budget = [_MAX_ITEMS]

    def dec(x, depth):
        budget[0] -= 1
        if depth > _MAX_DEPTH or budget[0] < 0 or type(x) is not list or not x or type(x[0]) is not str:
            raise NotPlain("malformed plain value")
        tag, rest = x[0], x[1:]
        if tag == "N" and not rest:
            return None
        if len(rest) == 1:
            (v,) = rest
            if tag == "b" and type(v) is bool:
                return v
            if tag == "i" and type(v) is str and re.fullmatch(r"-?[0-9a-f]+", v):
                return int(v, 16)
            if tag == "f" and type(v) is str:
                return float.fromhex(v)
            if tag == "s" and type(v) is str:
                return v
            if tag == "y" and type(v) is str:
                return bytes.fromhex(v)
            if tag in ("l", "t", "S", "F") and type(v) is list:
                items = [dec(item, depth + 1) for item in v]
                return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
            if tag == "d" and type(v) is list:
                out = {}
                for pair in v:
                    if type(pair) is not list or len(pair) != 2:
                        raise NotPlain("malformed plain value")
                    out[dec(pair[0], depth + 1)] = dec(pair[1], depth + 1)
                return out
        if tag == "c" and len(rest) == 2 and all(type(v) is str for v in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        raise NotPlain("malformed plain value")

    return dec(data, 0)


def _line_reader(fd, limit=64 << 20):
    """readline() over a raw descriptor; b"" at end of file."""
    buffer = bytearray()

    def readline():
        while True:
            i = buffer.find(b"\n")
            if i >= 0:
                line = bytes(buffer[:i + 1])
                del buffer[:i + 1]
                return line
            if len(buffer) > limit:
                raise NotPlain("message too long")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            buffer.extend(chunk)

    return readline


def _flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 -- the candidate may have closed or replaced the stream
            pass


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- the two processes -------------------------------------------------------------------------------------------

def _judge(cfg, report_fd, job_fd):
    """Fork the candidate's process, then read the tests (the job's second part, still in the pipe: they never
    exist in the candidate's memory), run the trusted source and the tests here, calling the candidate's functions
    by value over two pipes. Only this process holds the report descriptor the verdict travels on."""
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_fd)  # before any candidate code: the verdict descriptor never exists in its process
            os.close(job_fd)
            _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # only the judge needs shielding; /proc/self works as usual
            os.close(call_w)
            os.close(reply_r)
            if cfg["python_guards"]:
                _python_guards()
            _serve(cfg["candidate"], call_r, reply_w)
        finally:
            os._exit(1)
    os.close(call_r)
    os.close(reply_w)
    try:
        tests = json.loads(_read_all(job_fd))
        os.close(job_fd)
    except BaseException:  # noqa: BLE001
        os.write(2, b"the sandbox could not read the tests\n")
        os._exit(1)
    if cfg["python_guards"]:
        _python_guards()
    passed = _run_tests(tests, pid, call_w, reply_r, report_fd, cfg["limits"]["cpu_s"])
    _flush_stdio()
    os.close(call_w)  # the candidate's process flushes its output and exits
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # already reaped after it died
        pass
    if passed:
        _report(report_fd, verdict="passed")
    os._exit(0 if passed else 1)


def _serve(candidate, call_r, reply_w):
    """The candidate's process: run its source, report its function names, then answer calls with plain values.
    Nothing here can change the verdict: the judge holds the expected values and compares them itself."""
    import builtins
    import linecache

    write, exit_, run, dumps, loads = os.write, os._exit, exec, json.dumps, json.loads
    format_exc, encode, decode = traceback.format_exc, encode_plain, decode_plain
    readline = _line_reader(call_r)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        linecache.cache["<candidate>"] = (len(candidate), None, candidate.splitlines(True), "<candidate>")
        run(compile(candidate, "<candidate>", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 -- the candidate's own failure: traceback to stderr
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        message = (f"SystemExit({e.code!r}) raised before the tests ran\n" if isinstance(e, SystemExit)
                   else format_exc())
        write(2, message.encode("utf-8", "replace"))
        exit_(1)
    names = [k for k, v in list(dict.items(namespace)) if type(k) is str and callable(v)]
    _flush_stdio()
    _write_all(reply_w, (dumps({"names": names}) + "\n").encode())
    while True:
        line = readline()
        if not line:
            _flush_stdio()
            exit_(0)
        request = loads(line)
        try:
            function = namespace[request["call"]]
            value = function(*decode(request["args"]), **decode(request["kwargs"]))
            try:
                reply = {"value": encode(value)}
            except NotPlain as e:
                reply = {"raise": ["TypeError", f"{request['call']}() returned {e}"]}
        except BaseException as e:  # noqa: BLE001 -- handed to the judge as a name and a message
            try:
                reply = {"raise": [type.__getattribute__(type(e), "__name__"), str(e)[:2000]]}
            except BaseException:  # noqa: BLE001
                reply = {"raise": ["Exception", "unprintable exception"]}
        _flush_stdio()
        _write_all(reply_w, (dumps(reply) + "\n").encode())


# Exceptions the candidate raises reach the tests as the same builtin type (tests may expect a ValueError);
# any other type arrives as a RuntimeError. StopIteration would end a generator silently, so it is not passed on.
_PASSED_ON = {name for name, value in vars(builtins).items()
              if isinstance(value, type) and issubclass(value, Exception)
              and name not in ("StopIteration", "StopAsyncIteration")}


def _run_tests(job, pid, call_w, reply_r, report_fd, cpu_s):
    """Run the trusted source, then the tests, with the candidate's functions replaced by proxies; True if the
    tests finished. The candidate's objects never reach this process: only plain values decoded here do."""
    import linecache

    readline = _line_reader(reply_r)

    def candidate_gone(during):
        _, status, usage = os.wait4(pid, 0)
        if os.WIFSIGNALED(status):
            signal_number = os.WTERMSIG(status)
            if usage.ru_utime + usage.ru_stime >= 0.9 * cpu_s:  # RLIMIT_CPU's kill: the parent reports a timeout
                _report(report_fd, candidate_signal=signal_number)
            raise RuntimeError(f"the candidate's process was killed by signal {signal_number} {during}")
        raise RuntimeError(f"the candidate's process ended (exit status {os.WEXITSTATUS(status)}) {during}")

    def proxy(name):
        def call(*args, **kwargs):
            request = json.dumps({"call": name, "args": encode_plain(list(args)), "kwargs": encode_plain(kwargs)})
            try:
                _write_all(call_w, (request + "\n").encode())
            except BrokenPipeError:
                candidate_gone(f"before a call to {name}()")
            line = readline()
            if not line:
                candidate_gone(f"during a call to {name}()")
            reply = json.loads(line)
            if type(reply) is dict and "value" in reply:
                return decode_plain(reply["value"])
            kind, message = reply["raise"]
            if type(kind) is not str or type(message) is not str:
                raise NotPlain("malformed reply from the candidate's process")
            if kind in _PASSED_ON:
                raise getattr(builtins, kind)(message)
            raise RuntimeError(f"{name}() raised {kind}: {message}")

        call.__name__ = call.__qualname__ = name
        return call

    try:
        trusted, tests = job["trusted"], job["tests"]
        for label, source in (("<trusted>", trusted), ("<tests>", tests)):
            linecache.cache[label] = (len(source), None, source.splitlines(True), label)
        trusted_code, tests_code = compile(trusted, "<trusted>", "exec"), compile(tests, "<tests>", "exec")
        line = readline()
        if not line:
            candidate_gone("before the tests ran")
        names = json.loads(line)["names"]
        if type(names) is not list or not all(type(n) is str and n.isidentifier() for n in names):
            raise NotPlain("malformed list of names from the candidate's process")
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        exec(trusted_code, namespace)  # noqa: S102 -- the judge runs the trusted harness source
        entry_points = set(job["entry_points"])
        for name in set(names) | entry_points:
            # The trusted source's own names (helpers the tests call) and builtins are never the candidate's.
            if name in entry_points or (name not in namespace and not hasattr(builtins, name)):
                namespace[name] = proxy(name)
        exec(tests_code, namespace)  # noqa: S102 -- the judge runs the tests it alone holds
        return True
    except BaseException:  # noqa: BLE001 -- a failed assertion, or anything else: traceback to stderr
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        os.write(2, traceback.format_exc().encode("utf-8", "replace"))
        return False


def main():
    config_fd, report_fd, caller = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    _libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # a crashed caller takes its sandboxes with it
    if os.getppid() != caller:
        os._exit(1)  # the caller died before the line above
    cfg = json.loads(_read_exact(config_fd, _read_header(config_fd)))  # the tests stay in the pipe for the judge
    ns_mode, ns_error = (None, "namespaces disabled")
    if cfg["namespaces"]:
        try:
            ns_mode, ns_error = _enter_namespaces()
        except OSError as e:
            ns_mode, ns_error = None, f"user namespace setup: {e}"
    pid = os.fork()
    if pid == 0:
        try:
            _child(cfg, report_fd, config_fd, ns_mode, ns_error)
        finally:
            os._exit(1)
    os.close(config_fd)
    _report(report_fd, child_pid=pid, namespaces=ns_mode, namespace_error=ns_error)
    os.close(report_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
