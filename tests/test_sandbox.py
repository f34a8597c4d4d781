"""The HumanEval sandbox: each escape a generated program might try is attempted and contained.

Every program here runs inside flexolmo_jax.sandbox (fresh uid, own namespaces, process limit), so
even the fork bomb cannot reach the machine running the tests.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from flexolmo_jax import codegen, sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Only root can switch to another uid and create namespaces; as root, a broken isolated mode fails
# (test_root_with_unshare_is_isolated) rather than skips.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's isolated mode needs root")


@pytest.fixture
def uid():
  return secrets.choice(sandbox.UID_RANGE)


def _processes_of(uid: int) -> list[int]:
  """Host pids of the live (or unreaped) processes whose real uid is `uid`."""
  pids = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/status", encoding="utf-8") as f:
        real = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration):  # Ended while we looked.
      continue
    if real == uid:
      pids.append(int(entry))
  return pids


def test_root_with_unshare_is_isolated():
  # So that a broken isolated mode fails here instead of quietly refusing every program below.
  if shutil.which("unshare") is None or shutil.which("setpriv") is None:
    pytest.skip("isolated mode needs util-linux `unshare` and `setpriv`")
  assert sandbox.isolation() == sandbox.Isolation(True, "")
  assert sandbox.isolation().describe().startswith("isolated:")


def test_passing_and_failing_programs_get_their_verdicts():
  assert sandbox.run_sandboxed("assert sum(range(4)) == 6\n") == {
      "passed": True, "result": "passed"}
  assert sandbox.run_sandboxed("assert 1 == 2, 'wrong'\n") == {
      "passed": False, "result": "failed: AssertionError: wrong"}
  assert sandbox.run_sandboxed("import sys\nsys.exit(3)\n") == {
      "passed": False, "result": "failed: exit 3"}


def test_the_program_runs_as_a_fresh_unprivileged_user_in_a_private_directory(uid):
  program = (f"import os\nassert os.getuid() == os.geteuid() == os.getgid() == {uid}\n"
             "assert os.getgroups() == []\n"
             "assert os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'] == '/tmp'\n"
             "open('scratch.txt', 'w').write('kept only in the sandbox')\n"
             "assert os.listdir('.') == ['scratch.txt']\n")
  assert sandbox.run_sandboxed(program, uid=uid) == {"passed": True, "result": "passed"}


def test_root_is_refused_as_the_sandbox_uid():
  with pytest.raises(ValueError, match="uid=0 is not an unprivileged user"):
    sandbox.run_sandboxed("pass\n", uid=0)


def test_writes_outside_the_private_directory_are_contained():
  # A world-writable host directory: only the read-only mounts keep the program out of it.
  open_dir = tempfile.mkdtemp(prefix="flexolmo_sandbox_test_", dir="/var/tmp")
  os.chmod(open_dir, 0o777)
  name = f"escaped_{os.getpid()}"
  targets = [os.path.join(open_dir, name), f"/dev/shm/{name}", f"/var/tmp/{name}",
             os.path.join(REPO, name), f"/root/{name}", f"/etc/{name}"]
  program = (f"targets = {targets!r}\n"
             "for path in targets:\n"
             "  try:\n"
             "    open(path, 'w').write('x')\n"
             "  except OSError:\n"
             "    continue\n"
             "  raise SystemExit('wrote ' + path)\n"
             # Host /tmp is a private tmpfs in the sandbox: this write succeeds but stays inside.
             f"open('/tmp/{name}', 'w').write('x')\n")
  try:
    assert sandbox.run_sandboxed(program) == {"passed": True, "result": "passed"}
    assert [p for p in targets + [f"/tmp/{name}"] if os.path.exists(p)] == []
  finally:
    for path in targets + [f"/tmp/{name}"]:
      if os.path.exists(path):
        os.remove(path)
    os.rmdir(open_dir)


def test_signals_cannot_reach_the_evaluator():
  evaluator = os.getpid()
  program = ("import os, signal\n"
             # The evaluator is not even visible: the sandbox has its own PID namespace and /proc.
             f"assert '{evaluator}' not in os.listdir('/proc')\n"
             f"for pid in (os.getppid(), {evaluator}, {os.getppid()}):\n"
             "  try:\n"
             "    os.kill(pid, signal.SIGKILL)\n"
             "  except (PermissionError, ProcessLookupError):\n"
             "    continue\n"
             "  raise SystemExit(f'signalled {pid}')\n"
             # -1: every process it has permission to signal, other than itself; there is none.
             "try:\n"
             "  os.kill(-1, signal.SIGKILL)\n"
             "except ProcessLookupError:\n"
             "  pass\n"
             "else:\n"
             "  raise SystemExit('signalled some process')\n")
  assert sandbox.run_sandboxed(program) == {"passed": True, "result": "passed"}


def test_the_process_limit_bounds_forking_and_every_child_dies_with_the_program(uid):
  program = ("import os, time\n"
             "forked = 0\n"
             "while True:\n"
             "  try:\n"
             "    if os.fork() == 0:\n"
             "      time.sleep(60)\n"
             "      os._exit(0)\n"
             "  except OSError:\n"
             "    raise SystemExit(f'forked {forked}')\n"
             "  forked += 1\n")
  # The program itself and 5 children make the 6 processes its uid may have.
  assert sandbox.run_sandboxed(program, processes=6, uid=uid) == {
      "passed": False, "result": "failed: forked 5"}
  assert _processes_of(uid) == []


def test_a_fork_bomb_ends_at_the_timeout_with_nothing_left(uid):
  program = ("import os\n"
             "while True:\n"
             "  try:\n"
             "    os.fork()\n"
             "  except OSError:\n"
             "    pass\n")
  assert sandbox.run_sandboxed(program, timeout=2.0, processes=8, uid=uid) == {
      "passed": False, "result": "timed out after 2 s"}
  assert _processes_of(uid) == []


def test_a_setsid_child_does_not_survive_a_passing_program(uid):
  # The child leaves the program's session and process group, tells the parent, and sleeps on.
  program = ("import os, time\n"
             "read, write = os.pipe()\n"
             "if os.fork() == 0:\n"
             "  os.setsid()\n"
             "  os.write(write, b'detached')\n"
             "  time.sleep(60)\n"
             "  os._exit(0)\n"
             "assert os.read(read, 8) == b'detached'\n")
  assert sandbox.run_sandboxed(program, uid=uid) == {"passed": True, "result": "passed"}
  assert _processes_of(uid) == []


def test_the_sandbox_dies_with_the_evaluator(uid):
  evaluator = subprocess.Popen(
      [sys.executable, "-c", "import sys\nfrom flexolmo_jax import sandbox\n"
       "sandbox.run_sandboxed('import time\\ntime.sleep(60)\\n', timeout=60,\n"
       "                      uid=int(sys.argv[1]))\n",
       str(uid)], cwd=REPO)
  try:
    assert _wait_for(lambda: _processes_of(uid)), "the sandboxed program never started"
  finally:
    evaluator.kill()
    evaluator.wait()
  assert _wait_for(lambda: not _processes_of(uid)), f"left running: {_processes_of(uid)}"


def _wait_for(condition, seconds: float = 20.0) -> bool:
  deadline = time.monotonic() + seconds
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def test_a_stderr_flood_is_truncated_and_the_evaluator_memory_stays_bounded():
  # 256 MiB of stderr; a fresh interpreter runs the sandbox so its peak RSS measures only this run.
  flood = ("import sys\n"
           "block = ('x' * 1023 + '\\n') * 1024\n"
           "for _ in range(256):\n"
           "  sys.stderr.write(block)\n"
           "raise SystemExit('flooded')\n")
  # VmHWM, not ru_maxrss: the latter carries over the forking parent's peak across exec.
  script = ("import json, sys\n"
            "from flexolmo_jax import sandbox\n"
            "result = sandbox.run_sandboxed(sys.argv[1], output_bytes=4096)\n"
            "peak = next(int(line.split()[1]) for line in open('/proc/self/status')\n"
            "            if line.startswith('VmHWM:'))\n"
            "print(json.dumps([result, peak]))\n")
  out = subprocess.run([sys.executable, "-c", script, flood], cwd=REPO, capture_output=True,
                       text=True, check=True, timeout=120).stdout
  result, peak_kib = json.loads(out)
  assert result == {"passed": False, "result": "failed: flooded"}
  assert peak_kib < 64 << 10


def test_the_program_cannot_connect_to_the_evaluator_s_loopback():
  with socket.create_server(("127.0.0.1", 0)) as listener:
    port = listener.getsockname()[1]
    program = ("import ctypes, struct\n"
               "for module in ('_socket', 'socket'):\n"
               "  try:\n"
               "    __import__(module)\n"
               "  except ImportError as err:\n"
               "    assert 'network access is disabled' in str(err), err\n"
               "  else:\n"
               "    raise SystemExit('imported ' + module)\n"
               # Past the import block: the system calls themselves, in an empty network namespace.
               "libc = ctypes.CDLL(None, use_errno=True)\n"
               "fd = libc.socket(2, 1, 0)\n"  # AF_INET, SOCK_STREAM
               f"address = struct.pack('=H', 2) + struct.pack('>H', {port})\n"
               "address += bytes([127, 0, 0, 1]) + bytes(8)\n"
               "assert fd >= 0 and libc.connect(fd, address, len(address)) == -1, 'connected'\n")
    assert sandbox.run_sandboxed(program) == {"passed": True, "result": "passed"}
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
      listener.accept()


def test_file_and_disk_limits():
  big_file = "open('big', 'wb').write(bytes(2 << 20))\n"
  assert sandbox.run_sandboxed(big_file, file_mb=1) == {
      "passed": False, "result": "failed: OSError: [Errno 27] File too large"}
  many_files = "for i in range(4):\n  open(f'part{i}', 'wb').write(bytes(1 << 20))\n"
  assert sandbox.run_sandboxed(many_files, file_mb=2, disk_mb=2) == {
      "passed": False, "result": "failed: OSError: [Errno 28] No space left on device"}


def test_without_isolation_code_runs_only_when_allowed_and_never_as_root(monkeypatch):
  monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(False, "simulated"))
  monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
  for allow in (False, True):
    with pytest.raises(sandbox.SandboxUnavailable, match="refusing to run untrusted code as root"):
      sandbox.run_sandboxed("pass\n", allow_unsandboxed=allow)
  monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
  with pytest.raises(sandbox.SandboxUnavailable, match="--allow_unsandboxed_code"):
    sandbox.run_sandboxed("pass\n")
  # HumanEval refuses before it generates anything (no model is needed to get this far).
  with pytest.raises(sandbox.SandboxUnavailable, match="--allow_unsandboxed_code"):
    codegen.evaluate_humaneval(None, None, None, problems=[])
  assert sandbox.run_sandboxed("pass\n", allow_unsandboxed=True) == {
      "passed": True, "result": "passed"}
  assert sandbox.run_sandboxed("import socket\n", allow_unsandboxed=True) == {
      "passed": False, "result": "failed: ImportError: network access is disabled in the sandbox"}
  assert sandbox.isolation().describe() == "unsandboxed: runs as uid 1000 (simulated)"


@pytest.mark.slow
def test_every_canonical_humaneval_solution_passes_in_the_sandbox():
  # The limits and the read-only system must not fail correct programs (about 25 s).
  problems = codegen.load_humaneval()
  failed = [(p["task_id"], outcome["result"]) for p in problems
            if not (outcome := sandbox.run_sandboxed(
                codegen.humaneval_program(p, p["canonical_solution"])))["passed"]]
  assert len(problems) == 164 and failed == []
