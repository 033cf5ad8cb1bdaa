"""lm-evaluation-harness backend `opdlm`: score a block-diffusion student (or an AR checkpoint).

    python -m megatron_opdlm.evaluation.lm_eval_cli --model opdlm \
        --model_args pretrained=runs/demo/train/checkpoints --tasks opdlm_qa \
        --include_path megatron_opdlm/evaluation/lm_eval_tasks --batch_size 8
    # Python: import megatron_opdlm.evaluation.lm_eval_backend, then
    #   lm_eval.simple_evaluate(model="opdlm", model_args="pretrained=DIR", tasks=[...])

`pretrained` is a Megatron checkpoint of this project (a converter output or a trainer save
directory; any TP/PP via tp=/pp= under torchrun) or an exported HF DLM directory (transformers,
the export's own remote code). Model args: remasking (static), threshold (0.9), steps_per_block
(block size), use_cache (true), dtype (fp32), seed, block_size / token_shift (evaluate an AR
checkpoint as an untrained student), max_gen_toks (256), device (HF only), chat_template_kwargs
(variables for the chat template, a mapping; on the command line as a separate argument
`"chat_template_kwargs={'enable_thinking': False}"`, or in a JSON --model_args) and its shortcut
enable_thinking (true / false, Qwen3), as lm-eval's hf model takes it.

- generate_until: the project's rollout engine, all requests with the same generation
  arguments in one call on `batch_size` slots (continuous batching; an HF export decodes them in
  lock-step batches of `batch_size`, longest prompts first), greedy unless the task asks for
  do_sample/temperature; the task's `until` strings are checked as each block is
  committed (a row stops there), then the text is cut at the first one; `max_gen_toks` is
  honoured (whole blocks decoded, the tokens cut); `--apply_chat_template` renders the
  tokenizer's chat template.
- loglikelihood / loglikelihood_rolling: evaluation.block_scoring (deterministic, B forwards per
  batch for any length; is_greedy = the greedy static sampler would produce the continuation).
- Data parallel: under torchrun with world > tp * pp, lm-eval's rank / world_size are the
  data-parallel rank / size and results are gathered over the data-parallel group.
`stats` keeps generated tokens and model forwards (tokens per forward) of generate_until.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import lm_eval.models  # noqa: F401  (the harness's own models, before ours is registered)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_opdlm.config import DiffusionConfig, RolloutConfig
from megatron_opdlm.evaluation.block_scoring import score_continuations
from megatron_opdlm.evaluation.lm_eval_engines import HFEngine, MegatronEngine, is_hf_export

_TRUE = {"1", "true", "yes", "on"}


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in _TRUE


def _template_kwargs(value, enable_thinking) -> dict:
    """model_args chat_template_kwargs (a mapping, or its text: '{enable_thinking: false}' or
    'enable_thinking=false') merged with the enable_thinking shortcut, checked."""
    from megatron_opdlm.data.tokenizer import check_template_kwargs, parse_template_kwargs

    where = "model_args chat_template_kwargs"
    kwargs = (
        parse_template_kwargs([value], where) if isinstance(value, str)
        else check_template_kwargs(value, where)
    )  # fmt: skip
    if enable_thinking is not None:
        if not isinstance(enable_thinking, bool) and str(enable_thinking).lower() not in (
            "true", "false"
        ):  # fmt: skip
            raise ValueError(f"model_args enable_thinking={enable_thinking!r}: use true or false")
        kwargs["enable_thinking"] = _flag(enable_thinking)
    return kwargs


@register_model("opdlm")
class OpdlmLM(TemplateLM):
    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        remasking: str = "static",
        threshold: float = 0.9,
        steps_per_block: int | None = None,
        use_cache=True,
        dtype: str = "fp32",
        seed: int = 1234,
        batch_size: int | str = 8,
        max_gen_toks: int = 256,
        tp: int = 1,
        pp: int = 1,
        block_size: int | None = None,
        token_shift=None,
        device: str | None = None,
        max_batch_size=None,
        chat_template_kwargs=None,
        enable_thinking=None,
        **unused,
    ):
        super().__init__()
        self.chat_template_kwargs = _template_kwargs(chat_template_kwargs, enable_thinking)
        unused.pop("trust_remote_code", None)  # the export is loaded with it: it is our code
        if unused:
            raise ValueError(
                f"unknown model_args {sorted(unused)} for --model opdlm (see "
                "megatron_opdlm/evaluation/lm_eval_backend.py)"
            )
        if pretrained is None:
            raise ValueError("--model_args pretrained=DIR is required (a checkpoint or HF export)")
        path = Path(pretrained)
        if not path.is_dir():
            raise ValueError(f"pretrained={pretrained!r} is not a directory")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported; pass a number (e.g. 8)")
        if dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype={dtype!r}: choose fp32, bf16 or fp16")
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self.max_gen_toks < 1:
            raise ValueError(
                f"batch_size={batch_size} and max_gen_toks={max_gen_toks} must be >= 1"
            )
        self.seed = int(seed)
        if is_hf_export(path):
            if block_size is not None or token_shift is not None:
                raise ValueError("block_size / token_shift are fixed by an HF export's config")
            self.engine = HFEngine(path, dtype, device, self.seed)
        else:
            as_diffusion = None
            if block_size is not None:
                as_diffusion = DiffusionConfig(int(block_size), _flag(token_shift or False))
            self.engine = MegatronEngine(path, int(tp), int(pp), dtype, self.seed, as_diffusion)
        block = self.engine.scoring.block_size
        self.rollout = RolloutConfig(
            steps_per_block=int(steps_per_block or block), remasking=remasking,
            threshold=float(threshold), temperature=0.0, use_kv_cache=_flag(use_cache),
        )  # fmt: skip
        self.rollout.validate()
        if not 1 <= self.rollout.steps_per_block <= block:
            raise ValueError(f"steps_per_block={steps_per_block} must be in [1, {block}]")
        self.engine.scoring = type(self.engine.scoring)(
            **{**self.engine.scoring.__dict__, "steps_per_block": self.rollout.steps_per_block}
        )
        self.tokenizer = self.engine.tokenizer
        self.pretrained = str(path)
        self._rank, self._world_size = self.engine.dp_rank, self.engine.dp_size
        self._device = torch.device("cpu")  # where lm-eval puts its request counts
        self._chat = False
        self.stats = {"generated_tokens": 0, "forwards": 0, "requests": 0}

    # ---- tokenizer / chat ----
    @property
    def eot_token_id(self) -> int:
        return self.engine.eos_token_ids[0]

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        if add_special_tokens is None:
            add_special_tokens = not self._chat  # the chat template already has its specials
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.directory).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        self._chat = True
        return self.tokenizer.apply_chat_template(
            chat_history, add_generation_prompt=add_generation_prompt, **self.chat_template_kwargs
        )

    # ---- data parallel (lm-eval's evaluator shards requests by rank / world_size) ----
    def all_gather(self, tensor):
        parts = [torch.as_tensor(pickle.loads(bytes.fromhex(t)))
                 for t in self._gather(pickle.dumps(tensor.cpu()).hex())]  # fmt: skip
        return torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        gathered = [pickle.loads(bytes.fromhex(t)) for t in self._gather(pickle.dumps(obj).hex())]
        return gathered if self.rank == dst else None

    def _gather(self, text: str) -> list[str]:
        from megatron_opdlm.runtime.collectives import gather_strings

        if self.world_size == 1:
            return [text]
        return gather_strings(text, group=self.engine.dp_group)

    def barrier(self) -> None:
        from megatron_opdlm.runtime.collectives import barrier

        if self.world_size > 1:
            barrier(self.engine.dp_group)

    def get_model_info(self) -> dict:
        return {
            "opdlm_engine": self.engine.kind,
            "opdlm_decoding": vars(self.rollout),
            "opdlm_block_size": self.engine.scoring.block_size,
            "opdlm_chat_template_kwargs": self.chat_template_kwargs,
            "opdlm_stats": self.stats,
        }

    # ---- loglikelihood ----
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))  # fmt: skip
        results: list = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm or
                          self.rank != 0, desc="opdlm loglikelihood"):  # fmt: skip
            chunk = order[start : start + self.batch_size]
            contexts, continuations = [], []
            for i in chunk:
                context, continuation = self._fit(requests[i][1], requests[i][2])
                contexts.append(context)
                continuations.append(continuation)
            scores = score_continuations(self.engine.forward, self.engine.scoring, contexts,
                                         continuations)  # fmt: skip
            for i, score in zip(chunk, scores, strict=True):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def _fit(self, context: list[int], continuation: list[int]):
        """Keep the continuation whole and the most recent context within max_length."""
        if not continuation:
            raise ValueError("an empty continuation cannot be scored")
        block = self.engine.scoring.block_size
        room = self.max_length - (-(-len(continuation) // block) * block)
        if room < 1:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length "
                             f"{self.max_length}")  # fmt: skip
        return (context or [self.prefix_token_id])[-room:], continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                            desc="opdlm loglikelihood_rolling"):  # fmt: skip
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length // 2, context_len=1,
                )
            ]  # fmt: skip
            scores = self._loglikelihood_tokens([(None, c, y) for c, y in windows],
                                                disable_tqdm=True)  # fmt: skip
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation ----
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(
                i
            )
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="opdlm generate_until")  # fmt: skip
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            rollout = self._rollout_for(kwargs)
            prompts = {i: self.tok_encode(requests[i].args[0]) for i in indices}
            # longest first: lock-step batches (the HF export) hold similar widths
            indices = sorted(indices, key=lambda i: -len(prompts[i]))
            # the group shares until / max_gen / rollout: one call, the engine batches it
            texts = self._generate_group([prompts[i] for i in indices], rollout, max_gen, until)
            for i, text in zip(indices, texts, strict=True):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return results

    def _rollout_for(self, kwargs: dict) -> RolloutConfig:
        rollout = RolloutConfig(**vars(self.rollout))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if _flag(kwargs.pop("do_sample", temperature > 0)) and temperature > 0:
            rollout.temperature = temperature
            rollout.top_k = int(kwargs.pop("top_k", 0) or 0)
            rollout.top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        for name in ("remasking", "threshold", "steps_per_block"):
            if name in kwargs:
                setattr(rollout, name, type(getattr(rollout, name))(kwargs.pop(name)))
        rollout.validate()
        return rollout

    def _generate_group(self, prompts, rollout, max_gen: int, until: list[str]) -> list[str]:
        block = self.engine.scoring.block_size
        longest = max(len(p) for p in prompts)
        max_new = -(-max_gen // block) * block
        room = self.max_length - max_new
        prompts = [p[-room:] for p in prompts] if longest > room else prompts

        def stop_rows(response: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            stop = lengths >= max_gen
            if until:
                for row in range(response.shape[0]):
                    if not stop[row]:
                        text = self.tok_decode(response[row, : int(lengths[row])].tolist())
                        stop[row] = any(s in text for s in until)
            return stop

        rows, forwards = self.engine.generate(prompts, rollout, max_new, stop_rows,
                                              self.batch_size)  # fmt: skip
        texts = []
        for tokens in rows:
            tokens = tokens[:max_gen]
            self.stats["generated_tokens"] += len(tokens)
            text = self.tok_decode(tokens)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        self.stats["forwards"] += int(sum(forwards))
        self.stats["requests"] += len(prompts)
        return texts
