import mmap

import pytest

from compress import memory

MIB = 2**20


def touched_block(size: int) -> mmap.mmap:
    """Fresh anonymous pages, every one written: resident whatever malloc has cached."""
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_memory_peak_covers_an_allocation_and_resets_at_the_next_mark():
    start = memory.mark()
    if not start.scoped or start.rss_bytes is None:
        pytest.skip("the kernel's peak RSS cannot be reset here (not Linux, or /proc/self/clear_refs refused)")
    block = touched_block(64 * MIB)
    if memory.status_bytes("VmRSS") - start.rss_bytes < 60 * MIB:
        block.close()
        pytest.skip("this system's /proc/self/status does not show 64 MiB of freshly written pages in VmRSS")
    first = memory.since(start)
    assert first["peak_rss_scope"] == "stage"
    assert first["peak_rss_bytes"] - first["rss_start_bytes"] >= 60 * MIB
    block.close()
    second = memory.since(memory.mark())
    assert second["peak_rss_bytes"] < first["peak_rss_bytes"] - 32 * MIB
    # the reset forgot the block's peak; the process's own figure keeps it
    assert memory.process_peak_bytes() >= first["peak_rss_bytes"]
