"""The TP=1 reference student and its weights resharded onto other layouts, for tests that
compare model-parallel layouts against TP=1 in one spawn (test_*_parallel)."""

from __future__ import annotations

import dataclasses

import torch


def load_full(chunks, full_state, tp_size, tp_rank):
    """Copy TP=1 / PP=1 parameters into this rank's chunks (its layers, its TP shard)."""
    from megatron.core.utils import get_attr_wrapped_model

    with torch.no_grad():
        for chunk in chunks:
            model = get_attr_wrapped_model(chunk, "decoder", return_model_obj=True)
            renames = {
                f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                for i, layer in enumerate(model.decoder.layers)
            }
            for name, param in model.named_parameters():
                source = name
                for local, global_ in renames.items():
                    if name.startswith(local):
                        source = global_ + name[len(local) :]
                full = full_state[source]
                if getattr(param, "tensor_model_parallel", False):
                    if name.endswith("linear_fc1.weight"):  # SwiGLU: [gate; up], split each
                        gate, up = full.chunk(2, dim=0)
                        full = torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
                    else:
                        full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
                param.copy_(full)


def each_layout(world_size, layouts, *overrides):
    """Yield (layout, chunks, config): "tp1" first (tiny_config with `overrides`, DP=2, each rank
    its own copy: the one-process reference), then every layout of `layouts` (name -> parallel
    config fields) rebuilt with the TP=1 weights resharded."""
    from megatron.core import parallel_state

    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed
    from tests.tiny import sharp_student, tiny_config

    config = tiny_config(*overrides)
    distributed.initialize(config.parallel, seed=1234)
    reference = sharp_student(config)
    full_state = {name: p.detach().clone() for name, p in reference[0].named_parameters()}
    yield "tp1", reference, config
    for layout, parallel in layouts.items():
        layout_config = dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, **parallel)
        )
        layout_config.validate(world_size)
        distributed.initialize(layout_config.parallel, seed=1234)
        chunks = build_student(layout_config)
        load_full(
            chunks,
            full_state,
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank(),
        )
        yield layout, chunks, layout_config
