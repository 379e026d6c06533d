from multiprocessing import shared_memory
from pathlib import Path

from slm.shm import clean_stale_shared_memory


def test_removes_only_blocks_no_living_process_maps(tmp_path):
    alive = shared_memory.SharedMemory(name="987654_locals", create=True, size=64)  # mapped by this process
    stale = Path("/dev/shm/987653_barrier")
    stale.write_bytes(b"\0" * 64)  # what a SIGKILLed run leaves: a block nobody maps
    unrelated = Path("/dev/shm/987653_not_streaming")
    unrelated.write_bytes(b"x")
    try:
        removed = clean_stale_shared_memory()
        assert "987653_barrier" in removed and not stale.exists()
        assert Path("/dev/shm/987654_locals").exists() and "987654_locals" not in removed
        assert unrelated.exists()
    finally:
        alive.close()
        alive.unlink()
        unrelated.unlink(missing_ok=True)
