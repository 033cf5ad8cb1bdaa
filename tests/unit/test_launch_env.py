"""Distributed start-up reads torchrun and SLURM variables alike."""

from __future__ import annotations

import pytest

from megatron_opdlm.runtime.distributed import expand_slurm_nodelist, read_launch_env


def test_torchrun_variables():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)
    assert (launch.master_addr, launch.master_port, launch.source) == ("n1", 1234, "torchrun")


def test_slurm_variables_without_torchrun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_JOB_NODELIST": "gpu[07-08],login1", "SLURM_JOB_ID": "4242"}  # fmt: skip
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 16, 5)
    assert launch.master_addr == "gpu07"
    assert launch.master_port == 20000 + 4242
    assert launch.source == "slurm"


def test_torchrun_wins_inside_slurm():
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    assert read_launch_env(env).source == "torchrun"


def test_single_process_default():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.source) == (0, 1, "single")


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("a[1,3-4],b2", ["a1", "a3", "a4", "b2"]),
        ("rack1-n[9-10]", ["rack1-n9", "rack1-n10"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts
