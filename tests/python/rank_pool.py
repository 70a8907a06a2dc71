"""A pool of ranks for the Python tests.

Starting a rank costs seconds (a fresh interpreter that imports torch, then a
gloo rendezvous), and the suite runs many small collective calls, so each
pool starts its processes once (spawned, as torch.multiprocessing.spawn
does) and then runs jobs on all of them: `pool.run(fn, *args)` calls
`fn(rank, world_size, *args)` on every rank and returns the results in rank
order. `fn` must be a module-level function (the ranks import it by name).
An exception on any rank fails the call with every failing rank's traceback.
"""
import os
import queue
import shutil
import tempfile
import traceback

import torch.multiprocessing as mp

# A job is a few small collective calls; the deadline only turns a hang into
# a failure. The library's own waits give up sooner (TPFUSE_TIMEOUT_MS).
JOB_TIMEOUT_S = 180
RANK_TIMEOUT_MS = "60000"


class RankFailure(AssertionError):
    pass


def _serve(rank, world_size, directory, jobs, results):
    os.environ["TPFUSE_TIMEOUT_MS"] = RANK_TIMEOUT_MS
    os.environ["TMPDIR"] = os.path.join(directory, "tmp")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file rendezvous in the pool's own directory: no port to race for when
    # several test files run at once.
    dist.init_process_group("gloo", init_method=f"file://{directory}/gloo-rendezvous", rank=rank,
                            world_size=world_size)
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # noqa: B036  (the test process reports it)
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size):
        self.world_size = world_size
        # The pool's files; its tmp/ is the ranks' TMPDIR, where tests check
        # that rendezvous directories do not outlive their use.
        self.directory = tempfile.mkdtemp(prefix=f"tpfuse-pytest-{world_size}-")
        os.mkdir(os.path.join(self.directory, "tmp"))
        context = mp.get_context("spawn")
        self._jobs = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_serve, daemon=True,
                            args=(rank, world_size, self.directory, self._jobs[rank],
                                  self._results))
            for rank in range(world_size)]
        for process in self._processes:
            process.start()
        self.broken = False

    def run(self, fn, *args):
        for jobs in self._jobs:
            jobs.put((fn, args))
        outcomes = {}
        while len(outcomes) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=JOB_TIMEOUT_S)
            except queue.Empty:
                self.broken = True
                missing = sorted(set(range(self.world_size)) - set(outcomes))
                raise RankFailure(f"{fn.__name__}: ranks {missing} did not answer within "
                                  f"{JOB_TIMEOUT_S} s") from None
            outcomes[rank] = (ok, value)
        failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failures:
            raise RankFailure("\n".join(f"{fn.__name__} failed on rank {rank}:\n{text}"
                                        for rank, text in sorted(failures.items())))
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self):
        if not self.broken:
            for jobs in self._jobs:
                jobs.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        shutil.rmtree(self.directory, ignore_errors=True)
