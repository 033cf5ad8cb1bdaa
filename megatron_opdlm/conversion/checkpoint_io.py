"""Moved to megatron_opdlm/checkpoint_layout.py (how a checkpoint is stored); kept as an alias
so that existing imports keep working."""

from megatron_opdlm.checkpoint_layout import *  # noqa: F403
from megatron_opdlm.checkpoint_layout import (  # noqa: F401 (private names some callers use)
    FORMAT_VERSION,
    LATEST,
    META_FILE,
    MODEL_DIR,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    _check_architecture,
    _is_extra_state,
    _sharded_state_dict,
    _unwrap,
)
