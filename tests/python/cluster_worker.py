"""The ranks of tests/python/cluster_test.sh, and the checks of what they wrote.

  cluster_worker.py rank OUT_DIR [--cut]   one rank (under torchrun or mpirun)
  cluster_worker.py judge JOB... [--same A B]...
  cluster_worker.py judge-cut DIR --cut-at T --timeout-ms MS --margin-s S
                              --survivors R,.. --lost R,..

`rank` runs every case on the job's group (2 hosts x 2 ranks, or the same
layout in one namespace with TPFUSE_HOST), a subgroup of ranks 0 and 1 (host
0), and writes OUT_DIR/rank<r>.pt (the outputs) and OUT_DIR/rank<r>.json
(comm_info of both groups, where the rank ran). With --cut it then calls the
operator in a loop until it raises, and writes OUT_DIR/cut-rank<r>.json: the
test cuts a host's link meanwhile.

`judge` checks each JOB (LABEL=DIR=TRANSPORT): comm_info, every output
bitwise the same on every rank and within its bound of the fp64 reference
(tests/python/reference.py and family_reference.py), and the family's exact
relations; --same A B asks for the outputs of jobs A and B to be bitwise
equal. `judge-cut` checks that every survivor raised within the deadline
after the cut, naming every lost rank.

The inputs are those of the pytest files (make_inputs, make_sp_inputs), so
the judge recomputes the reference without the ranks.
"""
import argparse
import datetime
import glob
import json
import os
import re
import socket
import sys
import time
import traceback

import torch

from family_reference import (BF16, F16, SPCase, all_gather_reference, make_sp_inputs,
                              mm_all_reduce_base_kwargs, norm_inputs, reduce_scatter_reference,
                              rms_norm_reference, rows_of, y_bound)
from reference import Case, make_inputs, reference

# npu_mm_all_reduce_base on the job's group: bf16 and f16, with bias, 2-D and
# 3-D, uneven K, a transposed weight, and several all-reduces in flight
# (comm_turn 3). Small: the bounds, not the sizes, are what is tested. One
# dtype (bf16) goes through the planner (comm_turn 0), which measures the
# transport once per communicator and dtype (about 5 s across these hosts);
# the f16 calls ask for their tiles.
ALL_REDUCE_CASES = {
    "all_reduce_bf16_turn3": Case(mode="plain", dtype=BF16, m=24, k=64, n=40, comm_turn=3),
    "all_reduce_f16_bias_3d": Case(mode="plain", dtype=F16, m=24, batch=2, k=64, n=40, bias=True,
                                   uneven_k=True, comm_turn=2),
    "all_reduce_bf16_bias_x2t": Case(mode="plain", dtype=BF16, m=16, k=48, n=32, bias=True,
                                     x2_transposed=True, seed=3),
}
ALL_GATHER_CASE = SPCase(dtype=BF16, m=6, k=48, n=32, bias=True)
REDUCE_SCATTER_CASE = SPCase(dtype=F16, m=12, k=48, n=32, bias=True, uneven=True, comm_turn=2)
NORM_CASE, NORM_EPSILON = Case(mode="plain", dtype=BF16, m=12, batch=2, k=64, n=32, bias=True), 1e-6
# Ranks 0 and 1, on host 0: a group inside one host.
SUBGROUP_RANKS = [0, 1]
SUBGROUP_CASE = Case(mode="plain", dtype=F16, m=16, k=64, n=24, bias=True, seed=5)
# The loop the link is cut under.
CUT_CASE = Case(mode="plain", dtype=BF16, m=32, k=128, n=128, seed=9)
# A rank whose operator has not failed this long after its first call
# reports that and exits (the test cuts the link a few seconds in).
CUT_LOOP_LIMIT_S = 60


# ---- a rank ----

def rank_and_size():
    """(rank, world size) from torchrun's variables, or Open MPI's under mpirun
    (which torch's env:// init then reads as RANK and WORLD_SIZE)."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
        os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def host_identity():
    """The emulated host this process runs on: hostname and network namespace."""
    return f"{socket.gethostname()} {os.readlink('/proc/self/ns/net')}"


def write_json(path, value):
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def comm_info(tpfuse, hcom):
    info = tpfuse.comm_info(hcom)
    return {key: (value if isinstance(value, (int, str, list)) else str(value))
            for key, value in dict(info).items()}


def run_cases(tpfuse, dist, rank, world_size):
    """(outputs by name, info): every case on the job's group and the subgroup."""
    hcom = tpfuse.get_comm_name()
    info = {"comm_info": comm_info(tpfuse, hcom)}
    outputs = {}
    for name, case in ALL_REDUCE_CASES.items():
        x1, x2, kwargs = make_inputs(case, rank)
        outputs[name] = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, reduce_op="sum", **kwargs)

    x1, x2, kwargs = make_sp_inputs(ALL_GATHER_CASE, rank, "all_gather")
    outputs["all_gather_out"], outputs["all_gather_gathered"] = tpfuse.npu_all_gather_base_mm(
        x1, x2, hcom, world_size, **kwargs)

    x1, x2, kwargs = make_sp_inputs(REDUCE_SCATTER_CASE, rank, "reduce_scatter")
    outputs["reduce_scatter_out"] = tpfuse.npu_mm_reduce_scatter_base(
        x1, x2, hcom, world_size, reduce_op="sum", **kwargs)
    outputs["reduce_scatter_all_reduced"] = tpfuse.npu_mm_all_reduce_base(
        x1, x2, hcom, **mm_all_reduce_base_kwargs(REDUCE_SCATTER_CASE, kwargs))

    x1, x2, kwargs = make_inputs(NORM_CASE, rank)
    residual, gamma = norm_inputs(NORM_CASE)
    outputs["norm_y"], outputs["norm_out"] = tpfuse.npu_mm_all_reduce_add_rms_norm(
        x1, x2, residual, gamma, hcom, reduce_op="sum", epsilon=NORM_EPSILON, **kwargs)
    outputs["norm_mm"] = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)

    # Every rank of the job creates the subgroup (torch's rule); its members use it.
    subgroup = dist.new_group(SUBGROUP_RANKS)
    if rank in SUBGROUP_RANKS:
        sub_hcom = tpfuse.get_comm_name(subgroup)
        info["subgroup_comm_info"] = comm_info(tpfuse, sub_hcom)
        x1, x2, kwargs = make_inputs(SUBGROUP_CASE, dist.get_rank(subgroup))
        outputs["subgroup_all_reduce"] = tpfuse.npu_mm_all_reduce_base(x1, x2, sub_hcom, **kwargs)
    return outputs, info


def cut_loop(tpfuse, rank, out_dir):
    """A first call, then calls until one raises: the link is cut meanwhile."""
    hcom = tpfuse.get_comm_name()
    x1, x2, kwargs = make_inputs(CUT_CASE, rank)
    tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
    write_json(os.path.join(out_dir, f"ready-rank{rank}.json"), {"rank": rank, "at": time.time()})
    calls, last_ok = 1, time.time()
    limit = time.monotonic() + CUT_LOOP_LIMIT_S
    record = {"rank": rank, "host": host_identity()}
    while time.monotonic() < limit:
        try:
            tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
        except RuntimeError as error:
            record.update(raised_at=time.time(), last_ok=last_ok, calls=calls,
                          message=str(error))
            write_json(os.path.join(out_dir, f"cut-rank{rank}.json"), record)
            print(f"rank {rank}: raised after {calls} calls: {error}", file=sys.stderr, flush=True)
            return 0
        calls, last_ok = calls + 1, time.time()
    record.update(raised_at=None, last_ok=last_ok, calls=calls,
                  message=f"no error within {CUT_LOOP_LIMIT_S} s")
    write_json(os.path.join(out_dir, f"cut-rank{rank}.json"), record)
    print(f"rank {rank}: no error within {CUT_LOOP_LIMIT_S} s ({calls} calls)", file=sys.stderr,
          flush=True)
    return 1


def rank_main(out_dir, cut):
    rank, world_size = rank_and_size()
    # The TPFUSE_HOST layout of one namespace: the host of each rank.
    host_of_rank = os.environ.get("TPFUSE_TEST_HOST_OF_RANK")
    if host_of_rank:
        os.environ["TPFUSE_HOST"] = host_of_rank.split(",")[rank]
    started = time.monotonic()
    torch.set_num_threads(1)
    import torch.distributed as dist
    # gloo's own waits (the rendezvous, new_group) end after a minute.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    import tpfuse
    joined = time.monotonic()

    info = {"rank": rank, "world_size": world_size, "pid": os.getpid(),
            "host": os.environ.get("TPFUSE_HOST") or host_identity()}
    try:
        outputs, more = run_cases(tpfuse, dist, rank, world_size)
    except Exception:  # noqa: BLE001  (reported to the judge, then the rank fails)
        info["error"] = traceback.format_exc()
        write_json(os.path.join(out_dir, f"rank{rank}.json"), info)
        print(f"rank {rank} failed:\n{info['error']}", file=sys.stderr, flush=True)
        return 1
    info.update(more)
    torch.save(outputs, os.path.join(out_dir, f"rank{rank}.pt.tmp"))
    os.replace(os.path.join(out_dir, f"rank{rank}.pt.tmp"), os.path.join(out_dir, f"rank{rank}.pt"))
    write_json(os.path.join(out_dir, f"rank{rank}.json"), info)
    if rank == 0:
        print(f"rank 0: process group in {joined - started:.1f} s, the cases in "
              f"{time.monotonic() - joined:.1f} s", file=sys.stderr, flush=True)
    if cut:
        return cut_loop(tpfuse, rank, out_dir)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---- the judge ----

class Verdict:
    def __init__(self):
        self.failures = []

    def check(self, ok, what):
        if not ok:
            self.failures.append(what)
        return ok


def within(verdict, out, expected, bound, what):
    error = (out.double() - expected).abs()
    if not verdict.check(out.shape == expected.shape,
                         f"{what}: shape {tuple(out.shape)}, expected {tuple(expected.shape)}"):
        return
    worst = int((error - bound).argmax())
    verdict.check(bool((error <= bound).all()),
                  f"{what}: error {error.flatten()[worst]:.3g} exceeds its bound "
                  f"{bound.flatten()[worst]:.3g} at flat index {worst} (max error {error.max():.3g})")


def load_job(directory, world_size):
    infos, outputs = [], []
    for rank in range(world_size):
        with open(os.path.join(directory, f"rank{rank}.json")) as f:
            infos.append(json.load(f))
        if "error" in infos[-1]:
            raise RuntimeError(f"{directory}: rank {rank} failed:\n{infos[-1]['error']}")
        outputs.append(torch.load(os.path.join(directory, f"rank{rank}.pt")))
    return infos, outputs


def judge_job(verdict, label, infos, outputs, transport):
    p = len(infos)
    hosts = [info["host"] for info in infos]
    # The premises: ranks 0 and 1 share host 0, 2 and 3 host 1.
    verdict.check(hosts[0] == hosts[1] and hosts[2] == hosts[3] and hosts[0] != hosts[2],
                  f"{label}: ranks by host {hosts}, expected ranks 0, 1 on one host and 2, 3 on another")
    for rank, info in enumerate(infos):
        got = info["comm_info"]
        expected = {"rank": rank, "size": p, "hosts": 2, "ranks_on_host": 2,
                    "transport": transport}
        for key, value in expected.items():
            verdict.check(got.get(key) == value,
                          f"{label}, rank {rank}: comm_info {key} = {got.get(key)!r}, expected {value!r}")
        if rank in SUBGROUP_RANKS:
            sub = info.get("subgroup_comm_info", {})
            for key, value in {"rank": rank, "size": len(SUBGROUP_RANKS), "hosts": 1,
                               "ranks_on_host": len(SUBGROUP_RANKS), "transport": "shm"}.items():
                verdict.check(sub.get(key) == value,
                              f"{label}, rank {rank}: the subgroup's comm_info {key} = "
                              f"{sub.get(key)!r}, expected {value!r}")

    # Bitwise the same on every rank (the reduce-scatter's rows and the
    # all-gather's output are each rank's own; subgroup outputs, its members').
    shared = [name for name in outputs[0] if name not in ("reduce_scatter_out", "all_gather_out")]
    for rank in range(1, p):
        for name in shared:
            if name in outputs[rank]:
                verdict.check(torch.equal(outputs[rank][name], outputs[0][name]),
                              f"{label}: rank {rank}'s {name} differs from rank 0's")

    for name, case in ALL_REDUCE_CASES.items():
        expected, bound = reference(case, p)
        out = outputs[0][name]
        verdict.check(out.dtype == case.dtype, f"{label}: {name} is {out.dtype}")
        within(verdict, out, expected, bound, f"{label}: {name}")

    for rank in range(p):
        out, gathered = outputs[rank]["all_gather_out"], outputs[rank]["all_gather_gathered"]
        gathered_ref, expected, bound = all_gather_reference(ALL_GATHER_CASE, p, rank)
        verdict.check(torch.equal(gathered, gathered_ref),
                      f"{label}, rank {rank}: all_gather_base_mm's gather_out is not concat(x1)")
        within(verdict, out, expected, bound, f"{label}, rank {rank}: all_gather_base_mm")

    expected, bound = reduce_scatter_reference(REDUCE_SCATTER_CASE, p)
    for rank in range(p):
        out = outputs[rank]["reduce_scatter_out"]
        verdict.check(torch.equal(out, rows_of(outputs[rank]["reduce_scatter_all_reduced"], rank, p)),
                      f"{label}, rank {rank}: mm_reduce_scatter_base's output is not its rows "
                      "of mm_all_reduce_base's")
        within(verdict, out, rows_of(expected, rank, p), rows_of(bound, rank, p),
               f"{label}, rank {rank}: mm_reduce_scatter_base")

    residual, gamma = norm_inputs(NORM_CASE)
    y, norm_out, mm_out = (outputs[0][key] for key in ("norm_y", "norm_out", "norm_mm"))
    verdict.check(torch.equal(y, (mm_out.float().reshape(residual.shape) + residual.float())
                              .to(NORM_CASE.dtype)),
                  f"{label}: mm_all_reduce_add_rms_norm's y is not round(mm_out + residual)")
    mm_exact, mm_bound = reference(NORM_CASE, p)
    exact = mm_exact.reshape(residual.shape) + residual.double()
    within(verdict, y, exact, y_bound(NORM_CASE.dtype, exact, mm_bound.reshape(residual.shape)),
           f"{label}: mm_all_reduce_add_rms_norm's y")
    within(verdict, norm_out, *rms_norm_reference(y, gamma, NORM_EPSILON),
           f"{label}: mm_all_reduce_add_rms_norm's norm_out")

    expected, bound = reference(SUBGROUP_CASE, len(SUBGROUP_RANKS))
    verdict.check("subgroup_all_reduce" in outputs[0], f"{label}: no subgroup output")
    if "subgroup_all_reduce" in outputs[0]:
        within(verdict, outputs[0]["subgroup_all_reduce"], expected, bound,
               f"{label}: the subgroup's mm_all_reduce_base")


def judge_main(jobs, same, world_size):
    verdict = Verdict()
    loaded = {}
    for spec in jobs:
        label, directory, transport = spec.split("=")
        try:
            loaded[label] = load_job(directory, world_size)
        except (OSError, RuntimeError) as error:
            verdict.check(False, f"{label}: {error}")
            continue
        judge_job(verdict, label, *loaded[label], transport)
        print(f"{label}: {len(loaded[label][1][0])} outputs per rank checked "
              f"(transport {loaded[label][0][0]['comm_info'].get('transport')})")
    for a, b in same:
        if a not in loaded or b not in loaded:
            continue
        for rank, (mine, theirs) in enumerate(zip(loaded[a][1], loaded[b][1])):
            verdict.check(sorted(mine) == sorted(theirs),
                          f"rank {rank}: {a} has outputs {sorted(mine)}, {b} {sorted(theirs)}")
            for name in sorted(set(mine) & set(theirs)):
                verdict.check(torch.equal(mine[name], theirs[name]),
                              f"rank {rank}: {name} of {a} differs from {b}'s")
        print(f"{a} and {b}: bitwise the same outputs")
    for failure in verdict.failures:
        print(f"FAILED: {failure}")
    return 1 if verdict.failures else 0


def names_ranks(message, ranks):
    """Whether the message lists every rank of `ranks` after the word 'rank(s)'."""
    named = set()
    for listed in re.findall(r"\brank(?:s|\(s\))?[^0-9a-z]{0,3}((?:\d+(?:\s*(?:,|and|-|\.\.)\s*)?)+)", message):
        numbers = [int(x) for x in re.findall(r"\d+", listed)]
        if re.search(r"\d\s*(-|\.\.)\s*\d", listed) and len(numbers) == 2:
            named.update(range(numbers[0], numbers[1] + 1))
        else:
            named.update(numbers)
    return set(ranks) <= named


def judge_cut_main(directory, cut_at, timeout_ms, margin_s, survivors, lost):
    failures = []
    deadline = timeout_ms / 1000 + margin_s
    for path in sorted(glob.glob(os.path.join(directory, "cut-rank*.json"))):
        with open(path) as f:
            record = json.load(f)
        rank, raised = record["rank"], record["raised_at"]
        after = f"{raised - cut_at:.2f} s after the cut" if raised else "never"
        print(f"rank {rank} ({record['host']}): raised {after}, {record['calls']} calls, "
              f"last success {record['last_ok'] - cut_at:+.2f} s: {record['message']}")
    for rank in survivors:
        path = os.path.join(directory, f"cut-rank{rank}.json")
        if not os.path.exists(path):
            failures.append(f"rank {rank} reported nothing after the cut")
            continue
        with open(path) as f:
            record = json.load(f)
        if record["raised_at"] is None:
            failures.append(f"rank {rank} did not raise: {record['message']}")
            continue
        elapsed = record["raised_at"] - cut_at
        if elapsed < 0:
            failures.append(f"rank {rank} raised {-elapsed:.2f} s before the cut: "
                            f"{record['message']!r}")
        elif elapsed > deadline:
            failures.append(f"rank {rank} raised {elapsed:.2f} s after the cut, over "
                            f"TPFUSE_TIMEOUT_MS + {margin_s:g} s = {deadline:.2f} s")
        if not names_ranks(record["message"], lost):
            failures.append(f"rank {rank}'s message does not name ranks {lost}: "
                            f"{record['message']!r}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rank = commands.add_parser("rank")
    rank.add_argument("out_dir")
    rank.add_argument("--cut", action="store_true")
    judge = commands.add_parser("judge")
    judge.add_argument("jobs", nargs="+", metavar="LABEL=DIR=TRANSPORT")
    judge.add_argument("--same", nargs=2, action="append", default=[], metavar=("A", "B"))
    judge.add_argument("--world-size", type=int, default=4)
    cut = commands.add_parser("judge-cut")
    cut.add_argument("directory")
    cut.add_argument("--cut-at", type=float, required=True)
    cut.add_argument("--timeout-ms", type=float, required=True)
    cut.add_argument("--margin-s", type=float, required=True)
    cut.add_argument("--survivors", required=True)
    cut.add_argument("--lost", required=True)
    args = parser.parse_args()
    if args.command == "rank":
        return rank_main(args.out_dir, args.cut)
    if args.command == "judge":
        return judge_main(args.jobs, args.same, args.world_size)
    ranks = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    return judge_cut_main(args.directory, args.cut_at, args.timeout_ms, args.margin_s,
                          ranks(args.survivors), ranks(args.lost))


if __name__ == "__main__":
    sys.exit(main())
