"""Evaluation of AR teachers and block-diffusion students (tools/evaluate.py is the CLI).

- `scoring`: the exact-match rule for short answers (first sentence, numbers as numbers).
- `inputs`: the bundled held-out prompts and QA set, tokenized with the chat template.
- `models`: checkpoints as `EvalModel`s (an AR model decodes as block size 1 with token shift).
- `decoding`: greedy decoding settings (ar, static, dynamic_<t>) and timed generation.
- `metrics`: the teacher's NLL of a model's answers; forward KL on the model's on-policy states.
- `evaluator`: all of it for one model; `report`: tables, JSON, the plot over training tokens.
- `hf_reference`: SmolLM2 greedy answers through transformers (a Megatron-free cross-check).
"""
