"""Convert a dp_reshardable training checkpoint so that it resumes at another TP/PP layout.

    torchrun --nproc-per-node 8 tools/reshard_checkpoint.py runs/70b/checkpoints
    srun -n 64 python tools/reshard_checkpoint.py runs/70b/checkpoints/iter_0001200

Launch it with the saved process count (any multiple of the saved tp x pp works). It writes
`<iter>_fully_reshardable` beside the input (or --output) and moves `latest` to it; the training
run then resumes from the save directory at any layout. A training run whose process count is a
multiple of the saved tp x pp converts the checkpoint itself (megatron_opdlm/training/reshard.py).
Exit status: 0 done (or nothing to do), 2 bad input (one line on stderr).
"""

if __name__ == "__main__":
    # Imported here, not at the top: dist_checkpointing's save starts a multiprocessing manager
    # by spawn, which re-imports this file; without torch and Megatron it is up in a moment.
    from megatron_opdlm.cli_errors import run_cli

    run_cli("megatron_opdlm.training.reshard:main")
