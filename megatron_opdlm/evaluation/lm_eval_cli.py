"""lm-eval's command line with the `opdlm` model registered (lm-eval 0.4.x finds external models
only once their module is imported):

    python -m megatron_opdlm.evaluation.lm_eval_cli --model opdlm \
        --model_args pretrained=CKPT_OR_HF_DIR --tasks opdlm_qa \
        --include_path megatron_opdlm/evaluation/lm_eval_tasks --batch_size 8 --limit 32
(also installed as `opdlm-lm-eval`). A bad model argument is one line and exit code 2.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        import lm_eval.__main__ as harness
    except ImportError:
        print("error: lm-eval is not installed; run `pip install -e .[eval]`", file=sys.stderr)
        return 2
    import megatron_opdlm.evaluation.lm_eval_backend  # noqa: F401  (registers "opdlm")

    try:
        harness.cli_evaluate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
