"""Runs untrusted Python programs (HumanEval completions) so that they cannot reach the evaluator,
the network or the machine's files; docs/sandbox.md says what is contained and what is not.

Isolated mode (the evaluator is root; util-linux `unshare` and `setpriv` work): each program runs
under a fresh unprivileged uid, in its own PID, network, mount and IPC namespaces. Inside, a trusted
launcher (pid 1 of the namespace, still root there) remounts every filesystem read-only, mounts a
private, size-limited tmpfs on /tmp as the only writable place, and forks the program, which drops
to the sandbox uid, sets its resource limits and runs. When the program exits, pid 1 exits and the
kernel kills everything left in the namespace, so no child (not even one that called `setsid`)
outlives the verdict; the same happens if the evaluator dies mid-run. Anything else is unsandboxed
mode, allowed only with `allow_unsandboxed=True` and never as root: the program runs under the
evaluator's own uid with the same rlimits and its process group killed at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Fresh uids for sandboxed programs, outside the ranges distributions allocate: a uid of its own per
# run means RLIMIT_NPROC (counted per uid) bounds this program alone, and no two runs can signal
# each other.
UID_RANGE = range(1_900_000_000, 1_900_000_000 + (1 << 20))

# The trusted part, run as `python -I -B -c _LAUNCHER CONFIG`: in isolated mode it sets up the
# namespace as root (pid 1), then, in the program's process: privileges dropped, limits, no sockets.
_LAUNCHER = r"""
import ctypes, json, os, re, resource, sys
cfg = json.loads(sys.argv[1])
with open(cfg["program"], encoding="utf-8") as f:
  source = f.read()
if cfg["isolated"]:
  libc = ctypes.CDLL(None, use_errno=True)
  MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
  MS_BIND, MS_REC = 4096, 16384
  def check(status, what):
    if status != 0:
      err = ctypes.get_errno()
      raise OSError(err, f"{what}: {os.strerror(err)}")
  def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source, os.fsencode(target), fstype, flags, data), f"mount {target!r}")
  # The interpreter may live under a directory others cannot enter (/root/.pyenv): cover the first
  # such ancestor with an empty tmpfs and bind the installation back, so the sandbox uid can run it
  # while the rest of that directory stays hidden.
  covered = {}
  for prefix in {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}:
    parents = [os.path.dirname(prefix)]
    while parents[-1] != "/":
      parents.append(os.path.dirname(parents[-1]))
    closed = [p for p in parents[:-1] if not os.stat(p).st_mode & 0o001]
    if closed:
      covered[prefix] = (closed[-1], os.open(prefix, os.O_PATH))
  for closed in {c for c, _ in covered.values()}:
    mount(b"tmpfs", closed, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
  for prefix, (_, fd) in covered.items():
    os.makedirs(prefix, exist_ok=True)
    mount(f"/proc/self/fd/{fd}".encode(), prefix, None, MS_BIND | MS_REC)
    os.close(fd)
  # Every mount read-only and setuid-free (mount flags are per namespace; the host keeps its own).
  with open("/proc/self/mountinfo", "rb") as f:
    targets = {re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4])
               for line in f}
  for target in sorted(targets):
    try:
      kept = os.statvfs(target).f_flag & (MS_NODEV | MS_NOEXEC)
    except FileNotFoundError:  # Under a directory covered above: unreachable.
      continue
    mount(b"none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | kept)
  uid = cfg["uid"]
  mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV,
        f"mode=0700,uid={uid},gid={uid},size={cfg['disk_mb']}m".encode())
  program = os.fork()
  if program:
    # pid 1: reap orphans until the program ends, then exit with its status, which kills the rest.
    while True:
      pid, status = os.wait()
      if pid == program:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)
  check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # Setuid binaries cannot give root back.
  os.chdir("/tmp")
  resource.setrlimit(resource.RLIMIT_NPROC, (cfg["processes"], cfg["processes"]))
for name, value in (("RLIMIT_AS", cfg["memory"]), ("RLIMIT_CPU", cfg["cpu"]),
                    ("RLIMIT_FSIZE", cfg["fsize"]), ("RLIMIT_CORE", 0)):
  resource.setrlimit(getattr(resource, name), (value, value))
class NoNetwork:
  @staticmethod
  def find_spec(name, path=None, target=None):
    if name == "_socket":  # `socket` and everything built on it import this.
      raise ImportError("network access is disabled in the sandbox")
sys.modules.pop("_socket", None)
sys.meta_path.insert(0, NoNetwork)
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


class SandboxUnavailable(ValueError):
  """Untrusted code would run without isolation (a ValueError, so command lines report it as a
  usage error)."""


@dataclasses.dataclass(frozen=True)
class Isolation:
  """Whether this machine can run programs in isolated mode, and if not, why."""
  isolated: bool
  reason: str

  def describe(self) -> str:
    if self.isolated:
      return ("isolated: fresh unprivileged uid; own pid, network, mount and IPC namespaces; "
              "read-only filesystems except a private tmpfs")
    return f"unsandboxed: runs as uid {os.geteuid()} ({self.reason})"


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
  """Probes isolated mode once per process by running an empty program in it."""
  if os.geteuid() != 0:
    return Isolation(False, "the evaluator is not root, so it cannot switch to another uid or "
                            "create namespaces")
  missing = [c for c in ("unshare", "setpriv") if shutil.which(c) is None]
  if missing:
    return Isolation(False, f"util-linux's {' and '.join(missing)} not installed")
  outcome = _run("pass", isolated=True, timeout=30.0, memory_mb=256, processes=2, file_mb=1,
                 disk_mb=1, output_bytes=4096, uid=None)
  if outcome["passed"]:
    return Isolation(True, "")
  return Isolation(False, f"isolated mode failed here: {outcome['result']}")


def require_isolation(allow_unsandboxed: bool) -> Isolation:
  """This machine's isolation, or SandboxUnavailable when untrusted code may not run here."""
  iso = isolation()
  if iso.isolated:
    return iso
  if os.geteuid() == 0:
    raise SandboxUnavailable(
        f"refusing to run untrusted code as root without isolation ({iso.reason}); run where "
        f"root may use `unshare` (CAP_SYS_ADMIN), or as an unprivileged user with "
        f"--allow_unsandboxed_code")
  if not allow_unsandboxed:
    raise SandboxUnavailable(
        f"generated code cannot be isolated on this machine ({iso.reason}); run as root with "
        f"`unshare` available, or pass --allow_unsandboxed_code to run it under your own uid")
  return iso


def run_sandboxed(program: str, *, timeout: float = 10.0, memory_mb: int = 1024,
                  processes: int = 8, file_mb: int = 16, disk_mb: int = 64,
                  output_bytes: int = 64 << 10, allow_unsandboxed: bool = False,
                  uid: int | None = None) -> dict:
  """Runs a Python program in the sandbox: {"passed": exit status 0, "result": why}.

  Limits: `timeout` seconds of wall clock (then everything is killed), `memory_mb` of address
  space and `file_mb` per file in each process, `processes` processes and threads (isolated mode),
  `disk_mb` for the private /tmp (isolated mode), the last `output_bytes` of stderr kept (stdout is
  discarded). `uid`: the unprivileged uid to run as in isolated mode (default: a fresh one from
  UID_RANGE). Raises SandboxUnavailable as `require_isolation` says.
  """
  if uid is not None and uid <= 0:
    raise ValueError(f"uid={uid} is not an unprivileged user: pass a uid above 0, or none to get a "
                     f"fresh one")
  iso = require_isolation(allow_unsandboxed)
  return _run(program, isolated=iso.isolated, timeout=timeout, memory_mb=memory_mb,
              processes=processes, file_mb=file_mb, disk_mb=disk_mb, output_bytes=output_bytes,
              uid=uid)


def _fresh_uid() -> int:
  while True:
    uid = secrets.choice(UID_RANGE)  # Not `random`: a seeded evaluator would repeat its uids.
    try:
      pwd.getpwuid(uid)
    except KeyError:
      return uid


def _run(program: str, *, isolated: bool, timeout: float, memory_mb: int, processes: int,
         file_mb: int, disk_mb: int, output_bytes: int, uid: int | None) -> dict:
  with tempfile.TemporaryDirectory(prefix="flexolmo_sandbox_") as workdir:
    path = os.path.join(workdir, "program.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(program)
    cfg = {"program": path, "isolated": isolated, "uid": _fresh_uid() if uid is None else uid,
           "processes": processes, "disk_mb": disk_mb, "memory": memory_mb << 20,
           "cpu": math.ceil(timeout) + 1, "fsize": file_mb << 20}
    cmd = (sys.executable, "-I", "-B", "-c", _LAUNCHER, json.dumps(cfg))
    if isolated:
      # If the evaluator dies, setpriv's death signal kills unshare, whose --kill-child kills pid 1
      # and with it the namespace.
      cmd = (shutil.which("setpriv"), "--pdeathsig", "KILL", "--", shutil.which("unshare"),
             "--pid", "--kill-child", "--mount-proc", "--net", "--ipc", "--") + cmd
    home = "/tmp" if isolated else workdir
    proc = subprocess.Popen(cmd, cwd="/" if isolated else workdir,
                            env={"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
      stderr, timed_out = _read_tail(proc.stderr, output_bytes, time.monotonic() + timeout)
    finally:
      _end(proc, isolated)
  if timed_out:
    return {"passed": False, "result": f"timed out after {timeout:g} s"}
  if proc.returncode == 0:
    return {"passed": True, "result": "passed"}
  lines = stderr.decode("utf-8", "replace").strip().splitlines()
  # The exception is at the end of the last line; a flood without newlines keeps only that end.
  return {"passed": False,
          "result": "failed: " + (lines[-1][-500:] if lines else f"exit {proc.returncode}")}


def _end(proc: subprocess.Popen, isolated: bool) -> None:
  """Kills whatever is left of a run, always (not only on timeout); in isolated mode it returns
  only once every process of the namespace is gone."""
  if isolated:
    # Killing pid 1 kills the whole namespace, and unshare, which waits for pid 1, exits only after
    # that; killing unshare first would return while the namespace is still being torn down.
    for pid in _children(proc.pid):
      os.kill(pid, signal.SIGKILL)
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # Before unshare forked pid 1: --kill-child ends it.
      pass
  if proc.returncode is None:  # Not reaped yet, so its process group id cannot have been reused.
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.stderr.close()
  proc.wait()


def _children(pid: int) -> list[int]:
  found = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        # pid (comm) state ppid ...; comm may hold spaces and parentheses.
        if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
          found.append(int(entry))
    except (OSError, IndexError, ValueError):  # Ended while we looked.
      continue
  return found


def _read_tail(pipe, limit: int, deadline: float) -> tuple[bytes, bool]:
  """The last `limit` bytes read from `pipe` until EOF, and whether `deadline` came first."""
  tail = bytearray()
  poller = select.poll()  # Not select.select: the evaluator may hold more than 1024 descriptors.
  poller.register(pipe, select.POLLIN)
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return bytes(tail), True
    if not poller.poll(math.ceil(remaining * 1000)):
      continue
    chunk = os.read(pipe.fileno(), 1 << 16)
    if not chunk:  # Every process holding the pipe has ended.
      return bytes(tail), False
    tail += chunk
    del tail[:-limit]
