"""Run a test body in N gloo processes (torch.multiprocessing spawn) and collect results.

    def _body(rank, world_size, arg):        # module-level, so spawn can pickle it
        ...; return {"loss": 1.0}            # picklable result per rank

    results = run_distributed(_body, world_size=2, args=(arg,))   # list, one per rank

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT like torchrun sets them, a fresh
TMPDIR, and one intra-op thread (the machine has 2 cores; N processes x N threads thrash). A
failure on any rank raises with that rank's traceback. Start-up costs 3-5 s per call: group checks.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, env):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        result = fn(rank, world_size, *args)
        payload = {"ok": True, "result": result}
    except BaseException:  # noqa: BLE001 (CheckpointException is a BaseException)
        payload = {"ok": False, "error": traceback.format_exc()}
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    if not payload["ok"]:
        raise SystemExit(1)
    try:
        from megatron_opdlm.runtime import distributed

        distributed.shutdown()
    except Exception:  # noqa: BLE001 (best effort teardown)
        pass


def run_distributed(fn, world_size: int, args: tuple = (), env: dict | None = None) -> list:
    with tempfile.TemporaryDirectory(prefix="opdlm-dist-") as out_dir:
        env = {"TMPDIR": out_dir, **(env or {})}
        context = mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, out_dir, env),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join():
                pass
        except Exception:  # noqa: BLE001 (report the rank's own traceback below)
            pass
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (crashed or killed)")
                continue
            with open(path, "rb") as f:
                payload = pickle.load(f)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {rank}:\n{payload['error']}")
        if errors:
            raise AssertionError("distributed test failed\n" + "\n".join(errors))
        return results
