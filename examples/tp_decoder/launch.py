"""Runs a function on p ranks: processes started by torch.multiprocessing.spawn,
a gloo process group, the cores shared among them.

    results = launch.run(fn, ranks, *args)   # fn(rank, ranks, group, *args) on every rank

Each rank's return value comes back in rank order. The ranks meet through a
file in a private directory, removed afterwards. tpfuse is imported from the
environment, or from this checkout's build/python where it is not installed.
"""
import os
import pathlib
import pickle
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_BUILD = pathlib.Path(__file__).resolve().parents[2] / "build" / "python"
try:
    import tpfuse  # noqa: F401
except ImportError:
    if not (_BUILD / "tpfuse").is_dir():
        raise
    sys.path.insert(0, str(_BUILD))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_BUILD), os.environ.get("PYTHONPATH")]))


def threads_per_rank(ranks):
    return max(1, (os.cpu_count() or 1) // ranks)


def _rank_main(rank, ranks, directory, fn, args):
    # The same share of the cores for torch and for tpfuse, whose GEMMs on a
    # group of one rank would otherwise take every core of the host.
    threads = threads_per_rank(ranks)
    torch.set_num_threads(threads)
    os.environ.setdefault("TPFUSE_NUM_THREADS", str(threads))
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                            world_size=ranks)
    try:
        value = fn(rank, ranks, dist.group.WORLD, *args)
        # A file, pickled as bytes: a queue would hold large results in a
        # pipe that nobody reads until every rank is done, and would pass
        # tensors as shared memory that ends with this process.
        with open(os.path.join(directory, f"rank{rank}.pickle"), "wb") as f:
            pickle.dump(value, f)
    finally:
        dist.destroy_process_group()


def run(fn, ranks, *args):
    """fn(rank, ranks, group, *args) on `ranks` processes; their return values in rank order."""
    if ranks < 1:
        raise ValueError(f"ranks: expected at least 1, got {ranks}")
    # torch's OpenMP threads spin for a while after each parallel region; with
    # tpfuse's GEMM threads on the same cores that spinning takes their time
    # (1 rank, 2 threads, 512-token prefill: tpfuse 2.31 s spinning against
    # 1.63 s passive, torch itself 2.12 against 1.89 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    directory = tempfile.mkdtemp(prefix="tp-decoder-")
    try:
        mp.spawn(_rank_main, args=(ranks, directory, fn, args), nprocs=ranks)
        values = []
        for rank in range(ranks):
            with open(os.path.join(directory, f"rank{rank}.pickle"), "rb") as f:
                values.append(pickle.load(f))
        return values
    finally:
        shutil.rmtree(directory, ignore_errors=True)
