"""Will it fit: plan memory and layout for an OPDLM teacher + student pair before launching.

    python tools/plan.py --hf-config examples/hf_configs/llama-3-70b.json --nodes 8 \
        --gpu h100-80g --tp 8 --pp 2                       # one layout, per-phase breakdown
    python tools/plan.py --hf-config examples/hf_configs/qwen3-8b.json --nodes 1 --search
    python tools/plan.py --config examples/configs/tiny_cpu.yaml --impl local --gpu-memory-gb 4

See docs/planning.md. Exit status: 0 when the (best) layout fits, 1 when none fits, 2 on bad input.
"""

import sys

from megatron_opdlm.planning.cli import main

if __name__ == "__main__":
    sys.exit(main())
