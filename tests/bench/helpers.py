import torch

from compress import bench


def run_tiny(name: str, tmp_path_factory) -> tuple:
    """Run benchmark ``name`` at the tiny size on one thread (for module-scoped fixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return bench.run(name, bench.Size.TINY, tmp_path_factory.mktemp("bench") / name)
    finally:
        torch.set_num_threads(threads)
