"""Train a block-diffusion student by OPDLM: `python tools/train.py --config FILE.yaml [k=v ...]`.

`--help` lists every config field. Exit codes (megatron_opdlm/training/cli.py): 0 finished,
1 non-finite value, 2 bad input, 3 stopped by a signal or the deadline after saving (run again).
"""

import signal
import time

# A stop signal that arrives while torch and Megatron are still importing (tens of seconds on a
# busy node) must not kill the process: remember it; the trainer honours it at its first stop
# point, like one that arrives later.
early_signals: list[tuple[int, float]] = []
for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, lambda signum, frame: early_signals.append((signum, time.monotonic())))

if __name__ == "__main__":
    # Imported here, not at the top: dist_checkpointing's save starts a multiprocessing manager
    # by spawn, which re-imports this file; without torch and Megatron it is up in a moment.
    from megatron_opdlm.cli_errors import run_cli

    def _main(argv):
        from megatron_opdlm.training.cli import main

        return main(argv, early_signals=early_signals)

    run_cli(_main)
