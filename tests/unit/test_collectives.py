"""runtime.collectives: Python values in, Python values out, tensors on the group's device.

One process without a process group (identity), then one 2-rank gloo spawn (every function
against the values each rank contributed; exact, integers and float64 sums of two numbers).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.runtime import collectives
from tests.dist_utils import run_distributed


def test_without_a_process_group_every_function_is_one_rank():
    assert collectives.comm_device() == torch.device("cpu")
    assert collectives.all_reduce_values([3, True, 2]) == [3, 1, 2]
    assert collectives.all_reduce_values([1.5]) == [1.5]
    assert collectives.any_rank(True) and not collectives.any_rank(False)
    assert collectives.ranks_where(True) == [0] and collectives.ranks_where(False) == []
    assert collectives.gather_strings("x") == ["x"]
    with pytest.raises(ValueError, match="op='mean'"):
        collectives.all_reduce_values([1], op="mean")


def _body(rank, world_size):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    out = {
        "device": str(collectives.comm_device()),
        "sum_int": collectives.all_reduce_values([rank + 1, 10]),
        "sum_float": collectives.all_reduce_values([0.25 * (rank + 1)]),
        "max": collectives.all_reduce_value(rank * 7, op="max"),
        "min": collectives.all_reduce_value(rank * 7 + 1, op="min"),
        "any_only_rank1": collectives.any_rank(rank == 1),
        "any_none": collectives.any_rank(False),
        "where": collectives.ranks_where(rank == 1),
        "strings": collectives.gather_strings(None if rank == 0 else f"bad on {rank}"),
    }
    tensor = torch.full((2,), float(rank))
    collectives.broadcast_tensor_(tensor, src=1)
    out["broadcast"] = tensor.tolist()
    return out


@pytest.mark.distributed
def test_gloo_two_ranks_reduce_gather_and_broadcast_python_values():
    results = run_distributed(_body, world_size=2)
    for out in results:
        assert out["device"] == "cpu"  # gloo's device; NCCL's is CUDA (tests/gpu covers it)
        assert out["sum_int"] == [3, 20] and all(isinstance(v, int) for v in out["sum_int"])
        assert out["sum_float"] == [0.75]
        assert out["max"] == 7 and out["min"] == 1
        assert out["any_only_rank1"] is True and out["any_none"] is False
        assert out["where"] == [1]
        assert out["strings"] == [None, "bad on 1"]
        assert out["broadcast"] == [1.0, 1.0]
