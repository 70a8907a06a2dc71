"""torch.profiler sees the operators: each call is an event named after its
torch.ops entry, with its inputs' shapes when the profile records them, and
the operator's time is inside it."""
import torch
from torch.profiler import ProfilerActivity, profile

import tpfuse
from reference import Case, make_inputs


def profiled_calls(rank, world_size, case, calls):
    x1, x2, kwargs = make_inputs(case, rank)
    hcom = tpfuse.get_comm_name()
    tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)  # planned outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.key == "tpfuse::mm_all_reduce_base"]
    return [(e.count, [list(shape) for shape in e.input_shapes], e.cpu_time_total) for e in events]


def test_calls_appear_with_their_shapes(ranks):
    case = Case(mode="plain", dtype=torch.bfloat16, m=12, k=64, n=40, bias=True)
    calls = 3
    for rank, events in enumerate(ranks(2).run(profiled_calls, case, calls)):
        assert len(events) == 1, f"rank {rank}: expected one group of tpfuse::mm_all_reduce_base, got {events}"
        count, shapes, cpu_time_us = events[0]
        assert count == calls, f"rank {rank}: {count} events for {calls} calls"
        # x1, x2, then the bias among the tensors; scalars and strings record no shape.
        assert shapes[0] == [case.m, case.k] and shapes[1] == [case.k, case.n], \
            f"rank {rank}: input shapes {shapes}"
        assert [case.n] in shapes[2:], f"rank {rank}: no bias shape in {shapes}"
        assert cpu_time_us > 0, f"rank {rank}: the events took no time"
