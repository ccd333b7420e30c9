"""Shared fixtures: the repo on sys.path, the shared data folder, and p2pd bookkeeping."""
import os
import subprocess
import sys
import warnings

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", category=FutureWarning)  # hivemind's torch.jit use at import

os.environ["MARFL_OFFLINE"] = "1"  # tests never download
# every process a test starts inherits this marker, so leak checks see our p2pds and not other sessions' runs
TEST_MARKER = f"MARFL_TEST_SESSION={os.getpid()}-{os.urandom(4).hex()}"
os.environ["MARFL_TEST_SESSION"] = TEST_MARKER.split("=", 1)[1]
DATA_DIR = os.environ.get("MARFL_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))


def _ours(pid: int) -> bool:
    key, value = TEST_MARKER.split("=", 1)
    try:
        return psutil.Process(pid).environ().get(key) == value
    except psutil.Error:
        return False


def p2pd_pids() -> set:
    """PIDs of running p2pd daemons started by this test session (found by the inherited marker; read-only:
    tests only ever kill processes they started themselves)."""
    out = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split() if _ours(int(pid))}


# process inspection is shared with the /dev/shm watchdog
from shared_memory_handling import descendant_pids as descendants  # noqa: E402,F401 - used by tests
from shared_memory_handling import pid_alive as alive  # noqa: E402


@pytest.fixture
def no_new_p2pd():
    """Fail the test if it leaves a p2pd behind that was not running before it started."""
    before = p2pd_pids()
    yield
    left = {pid for pid in p2pd_pids() - before if alive(pid)}
    assert not left, f"p2pd processes left behind: {sorted(left)}"


@pytest.fixture(scope="session", autouse=True)
def unpacked_daemon():
    """Peers run the unpacked p2pd, as after scripts/setup_env.sh (a no-op once it is in the cache)."""
    from peer_synchronization import prepare_daemon_binary

    return prepare_daemon_binary()


@pytest.fixture(scope="session")
def data_dir():
    raw = os.path.join(DATA_DIR, "MNIST", "raw")
    if not os.path.isdir(raw):
        pytest.skip(f"MNIST not found under {DATA_DIR} (set MARFL_DATA_DIR)")
    return DATA_DIR
