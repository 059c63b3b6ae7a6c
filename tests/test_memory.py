import numpy as np
import pytest

from compress import memory


def test_memory_peak_covers_an_allocation_and_resets_at_the_next_mark():
    start = memory.mark()
    if not start.scoped or start.rss_bytes is None:
        pytest.skip("the kernel's peak RSS cannot be reset here (not Linux, or /proc/self/clear_refs refused)")
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, every page touched
    first = memory.since(start)
    assert first["peak_rss_scope"] == "stage"
    assert first["peak_rss_bytes"] - first["rss_start_bytes"] >= 60 * 2**20
    del block
    second = memory.since(memory.mark())
    assert second["peak_rss_bytes"] < first["peak_rss_bytes"] - 32 * 2**20
