"""Will it fit: memory and layout planning for the OPDLM teacher + student pair (docs/planning.md).

- `params`: exact parameter / gradient-buffer / optimizer-shard bytes per rank, from meta-device
  builds of the real chunks for every (TP rank, PP stage, VPP chunk) in one process;
- `activations`: saved-for-backward bytes per layer (local spec measured, Transformer Engine);
- `memory`: peak per rank and phase (rollout, teacher, student, optimizer, checkpoint);
- `search`: valid layouts for a GPU count, ranked by a FLOP + communication step-time model;
- `report`, `cli` (`opdlm-plan`), `inputs` (job YAML or HF config.json + knobs), `preflight`
  (tools/train.py), `gpus` (named GPUs), `measure` (what the code really allocates, for tests).
"""
