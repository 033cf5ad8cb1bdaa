"""The two model sources of the lm-eval backend: a Megatron checkpoint or an exported HF DLM.

Both offer the same three things to `lm_eval_backend.OpdlmLM`:
- `generate(prompts, rollout_cfg, max_new_tokens, stop_rows, batch_size)` -> (token lists up to
  and including EOS, forwards per row), through the project's rollout engine (Megatron, any
  TP/PP, the model-parallel group decodes the same prompts; continuous batching on `batch_size`
  slots) or the export's `generate` (the same algorithm, lock-step batches of `batch_size`);
- `forward(tokens, positions, mask, rows)` -> full-vocabulary logits [b, n, V] on every rank
  (block_scoring's Forward);
- `scoring` (block size, token shift, mask id, vocabulary) and `tokenizer`
  (megatron_opdlm.data.tokenizer, over the checkpoint's tokenizer/ or the export directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_opdlm.config import DiffusionConfig, ParallelConfig, PrecisionConfig, RolloutConfig
from megatron_opdlm.data.tokenizer import load_tokenizer
from megatron_opdlm.evaluation.block_scoring import ScoringModel

_HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_hf_export(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "opdlm" in json.loads(config.read_text())


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


class MegatronEngine:
    """A checkpoint of this project (teacher or student), on the current Megatron layout."""

    kind = "megatron"

    def __init__(self, ckpt: Path, tp: int, pp: int, dtype: str, seed: int,
                 as_diffusion: DiffusionConfig | None):  # fmt: skip
        from megatron.core import parallel_state

        from megatron_opdlm.checkpoint_layout import TOKENIZER_DIR, resolve_checkpoint_dir
        from megatron_opdlm.diffusion.model_runner import ModelRunner
        from megatron_opdlm.evaluation.models import load_eval_model
        from megatron_opdlm.models.vocab import init_mask_token_row
        from megatron_opdlm.runtime import distributed

        parallel = ParallelConfig(tp=tp, pp=pp)
        if not parallel_state.model_parallel_is_initialized():
            distributed.initialize(parallel, seed=seed)
            self.owns_state = True
        else:  # a caller's layout (e.g. tests, an outer script): it must be the one asked for
            self.owns_state = False
            current = (parallel_state.get_tensor_model_parallel_world_size(),
                       parallel_state.get_pipeline_model_parallel_world_size())  # fmt: skip
            if current != (tp, pp):
                raise ValueError(
                    f"model_args tp={tp} pp={pp}, but this process already runs Megatron with "
                    f"tp={current[0]} pp={current[1]}; pass tp={current[0]},pp={current[1]}"
                )
        ckpt = resolve_checkpoint_dir(ckpt)
        self.model = load_eval_model("lm_eval", ckpt, parallel, PrecisionConfig(dtype=dtype),
                                     as_diffusion)  # fmt: skip
        if as_diffusion is not None:  # an AR checkpoint's mask row: the mean embedding
            init_mask_token_row(self.model.chunks, self.model.model_cfg)
        self.runner = ModelRunner(self.model.chunks)
        self.tokenizer = load_tokenizer(ckpt / TOKENIZER_DIR)
        m, d = self.model.model_cfg, self.model.diffusion_cfg
        self.scoring = ScoringModel(d.block_size, d.token_shift, m.student_mask_token_id,
                                    m.vocab_size, m.pad_token_id, d.block_size)  # fmt: skip
        self.eos_token_ids = list(m.eos_token_ids)
        self.max_length = m.max_position_embeddings
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.seed = seed

    def generate(self, prompts, rollout_cfg: RolloutConfig, max_new_tokens: int, stop_rows,
                 batch_size: int):  # fmt: skip
        from megatron_opdlm.diffusion.engine import generate_rollout

        # every sequence samples from its own stream: its tokens do not depend on its neighbours
        batch = generate_rollout(self.model.chunks, prompts, self.model.model_cfg,
                                 self.model.diffusion_cfg, rollout_cfg, max_new_tokens,
                                 slots=batch_size, generator=_generator(self.seed, "cpu"),
                                 stop_rows=stop_rows)  # fmt: skip
        rows = [
            batch.response_tokens[i, : int(batch.response_valid[i].sum())].tolist()
            for i in range(len(prompts))
        ]
        return rows, batch.num_forwards.tolist()

    def forward(self, tokens, positions, mask, rows):
        from megatron_opdlm.diffusion.model_runner import eval_mode, sequence_parallel_off
        from megatron_opdlm.runtime import cpu_compat

        device = next(self.model.chunks[0].parameters()).device
        chunks = self.model.chunks
        with eval_mode(chunks), sequence_parallel_off(chunks), cpu_compat.small_row_linears(chunks):
            logits = self.runner.forward(tokens.to(device), positions.to(device),
                                         mask.to(device), rows.to(device))  # fmt: skip
        if self.runner.pp_size > 1:  # every stage needs the logits (is_greedy decisions)
            shape = (tokens.shape[0], rows.numel(), self.model.model_cfg.padded_vocab_size)
            if logits is None:
                logits = torch.empty(shape, dtype=torch.float32, device=device)
            logits = self.runner.broadcast_from_last_stage(logits.contiguous())
        return logits

    def close(self) -> None:
        if self.owns_state:
            from megatron_opdlm.runtime import distributed

            distributed.shutdown()


class HFEngine:
    """An exported DLM directory, loaded with transformers (trust_remote_code: our own code)."""

    kind = "hf"

    def __init__(self, directory: Path, dtype: str, device: str | None, seed: int):
        from transformers import AutoModelForCausalLM

        from megatron_opdlm.hf_export.remote_code.block_diffusion import model_logits

        self._model_logits = model_logits
        self.hf = AutoModelForCausalLM.from_pretrained(
            str(directory), trust_remote_code=True, dtype=_HF_DTYPES[dtype]
        ).eval()
        if device:
            self.hf.to(device)
        self.device = self.hf.get_input_embeddings().weight.device
        self.tokenizer = load_tokenizer(directory)
        cfg = self.hf.config
        opdlm = cfg.opdlm
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else self.tokenizer.pad_token_id
        self.eos_token_ids = (
            [int(e) for e in cfg.eos_token_id] if isinstance(cfg.eos_token_id, list)
            else [int(cfg.eos_token_id)]
        )  # fmt: skip
        self.scoring = ScoringModel(cfg.block_size, cfg.token_shift, cfg.mask_token_id,
                                    int(opdlm["vocab_size"]), int(pad), cfg.block_size)  # fmt: skip
        self.max_length = cfg.max_position_embeddings
        self.dp_rank, self.dp_size, self.dp_group = 0, 1, None
        self.seed = seed

    def generate(self, prompts, rollout_cfg: RolloutConfig, max_new_tokens: int, stop_rows,
                 batch_size: int):  # fmt: skip
        rows, forwards = [], []
        for start in range(0, len(prompts), batch_size):  # the export decodes in lock step
            batch_rows, batch_forwards = self._generate_batch(
                prompts[start : start + batch_size], rollout_cfg, max_new_tokens, stop_rows
            )
            rows.extend(batch_rows)
            forwards.extend(batch_forwards)
        return rows, forwards

    def _generate_batch(self, prompts, rollout_cfg: RolloutConfig, max_new_tokens: int, stop_rows):
        pad = self.scoring.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        prompt_width = ids.shape[1]

        def criteria(sequences, scores):
            response = sequences[:, prompt_width:]
            lengths = torch.tensor([_length(row, self.eos_token_ids) for row in response.tolist()])
            return stop_rows(response, lengths)

        sample = {}
        if rollout_cfg.temperature > 0:
            sample = dict(do_sample=True, temperature=rollout_cfg.temperature,
                          top_k=rollout_cfg.top_k, top_p=rollout_cfg.top_p)  # fmt: skip
        out = self.hf.generate(
            ids.to(self.device), attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens, remasking=rollout_cfg.remasking,
            threshold=rollout_cfg.threshold, steps_per_block=rollout_cfg.steps_per_block,
            use_cache=rollout_cfg.use_kv_cache, stopping_criteria=criteria,
            generator=_generator(self.seed, "cpu"), return_dict_in_generate=True, **sample,
        )  # fmt: skip
        lengths = (out.step_map >= 0).sum(dim=1).tolist()  # -1 past each row's end
        rows = [row[:n] for row, n in zip(out.sequences[:, prompt_width:].tolist(), lengths)]
        return rows, out.num_forwards.tolist()

    def forward(self, tokens, positions, mask, rows):
        with torch.no_grad():
            return self._model_logits(self.hf, tokens.to(self.device), positions.to(self.device),
                                      mask.to(self.device), rows.to(self.device))  # fmt: skip

    def close(self) -> None:
        pass


def _length(row: list[int], eos_ids: list[int]) -> int:
    """Tokens of a row still decoding: up to and including the first EOS, else all."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return i + 1
    return len(row)
