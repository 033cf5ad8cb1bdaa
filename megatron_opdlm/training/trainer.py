"""The OPDLM trainer: interleaved on-policy rollout and distillation, colocated teacher/student.

Per rollout step s (prompts_per_rollout prompts over all DP ranks):
  prompts (DP-sharded) -> x0: the student's own rollout (opdlm, opdlm_off) or the data's
  responses (offpolicy, mdlm_sft), cut at the curriculum's cap L_s -> x_t: states from the step map
  (opdlm) or random masks (baselines) -> prompts_per_rollout / global_batch_size optimizer steps,
  each: teacher targets (forward-only schedule) -> finite check -> student forward/backward
  (schedule, PP micro-batches) -> finite checks on loss and gradient norm -> optimizer step.
Stops (signal, deadline) are agreed at the end of a rollout step; the checkpoint is then saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron.core import parallel_state

from megatron_opdlm import config_base
from megatron_opdlm.config import JobConfig
from megatron_opdlm.data.prompts import PromptOrder
from megatron_opdlm.diffusion.engine import generate_rollout
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.distributed import device, is_rank0
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training import batches, checkpointing, setup
from megatron_opdlm.training.evaluate import evaluate_kl
from megatron_opdlm.training.metrics import StepLogger, memory_gib, reduce_loss_metrics
from megatron_opdlm.training.optimizer import grad_norm_then_step, set_learning_rate
from megatron_opdlm.training.resilience import StopRequest, check_finite, is_finite
from megatron_opdlm.training.schedules import learning_rate, rollout_length_cap
from megatron_opdlm.training.steps import (
    run_student,
    run_teacher,
    targets_are_finite,
    teacher_top_k,
)

log = get_logger("training")


@dataclass
class TrainResult:
    rollout_step: int
    optimizer_step: int
    stopped_early: str | None  # the stop reason, None when all steps ran
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None


class Trainer:
    """Build once (`Trainer(job)` after `runtime.distributed.initialize`), then `train()`."""

    def __init__(self, job: JobConfig, tokenizer=None):
        # Handle stop signals from the start: one arriving during set-up stops after a step.
        self.stop = StopRequest(job.train.deadline_minutes).install()
        try:
            self._setup(job, tokenizer)
        except BaseException:
            self.stop.uninstall()
            raise

    def _setup(self, job: JobConfig, tokenizer) -> None:
        world = collectives.group_size()
        setup.adopt_teacher_model_config(job)
        setup.check_job(job, world)
        self.job = job
        self.resume_from = setup.resolve_resume(job)
        tokenizer = tokenizer if tokenizer is not None else setup.load_tokenizer(job)
        self.train_data, self.eval_data = setup.load_datasets(job, tokenizer)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.order = PromptOrder(len(self.train_data), job.train.prompts_per_rollout,
                                 job.train.seed, self.dp_rank, self.dp_size)  # fmt: skip
        self.models = setup.build_models(job, resuming=self.resume_from is not None)
        self.steps_per_rollout = job.train.prompts_per_rollout // job.train.global_batch_size
        self.total_steps = job.train.rollout_steps * self.steps_per_rollout
        self.rollout_step = 0
        self.optimizer_step = 0
        self.last_save_seconds = 0.0
        if self.resume_from is not None:
            state = checkpointing.load_checkpoint(
                self.resume_from, self.models.student, self.models.optimizer, job
            )
            self.rollout_step = state["rollout_step"]
            self.optimizer_step = state["optimizer_step"]
            self.order.load_state_dict(state["prompt_order"])
        self.logger = StepLogger(job.train.run_dir, job.train.tensorboard, is_rank0())
        if self.resume_from is not None:
            self.logger.truncate(self.optimizer_step, self.rollout_step)
        if is_rank0():
            Path(job.train.run_dir).mkdir(parents=True, exist_ok=True)
            config_base.save_yaml(job, Path(job.train.run_dir) / "config.yaml")

    # ---- one optimizer step ----
    def _global_counts(self, micro_batches) -> tuple[int, int]:
        local = [sum(m.num_loss_tokens for m in micro_batches),
                 sum(m.num_loss_sequences for m in micro_batches)]  # fmt: skip
        tokens, sequences = collectives.all_reduce_values(
            local, group=parallel_state.get_data_parallel_group()
        )
        return int(tokens), int(sequences)

    def _optimizer_step(self, micro_batches, times: dict[str, float]) -> dict[str, float]:
        job, step = self.job, self.optimizer_step + 1  # 1-based, as in the console line
        policy = job.train.nan_policy
        tokens, sequences = self._global_counts(micro_batches)
        record = {"step": step, "lr": learning_rate(step - 1, job.optim, self.total_steps),
                  "loss_tokens": tokens, "skipped": 0.0, "grad_norm": float("nan")}  # fmt: skip
        if tokens == 0:
            log.warning("optimizer step %d has no loss token; skipped", step)
            return {**record, "skipped": 1.0}
        targets = None
        start = time.perf_counter()
        if self.models.teacher is not None and job.distill.mode != "mdlm_sft":
            targets = run_teacher(self.models.teacher, micro_batches, job, teacher_top_k(job))
            local_ok = targets is None or all(targets_are_finite(t) for t in targets)
            if not check_finite("teacher log-probs", local_ok, step, policy):
                return {**record, "skipped": 1.0}
        times["time_teacher"] = time.perf_counter() - start
        start = time.perf_counter()
        set_learning_rate(self.models.optimizer, record["lr"])
        for chunk in self.models.student:
            chunk.zero_grad_buffer()
        self.models.optimizer.zero_grad()
        metric_dicts = run_student(self.models.student, micro_batches, targets, job, tokens,
                                   sequences)  # fmt: skip
        times["time_student"] = time.perf_counter() - start
        start = time.perf_counter()
        losses_ok = all(is_finite(m["loss"]) for m in metric_dicts)
        record.update(reduce_loss_metrics(metric_dicts, job.distill.mode != "mdlm_sft"))
        if not check_finite("loss", losses_ok, step, policy):
            return {**record, "skipped": 1.0}
        if job.precision.dtype != "fp16":  # fp16: the loss scaler already skips inf/NaN steps
            success, record["grad_norm"] = grad_norm_then_step(
                self.models.optimizer,
                lambda norm: check_finite("gradient norm", is_finite(norm), step, policy),
            )
            if not success:
                return {**record, "skipped": 1.0}
        else:
            success, grad_norm, _ = self.models.optimizer.step()
            record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            record["skipped"] = 0.0 if success else 1.0
        times["time_optimizer"] = time.perf_counter() - start
        return record

    # ---- one rollout step ----
    def _make_batch(self, records, cap: int):
        job, step = self.job, self.rollout_step
        if job.distill.mode in setup.ROLLOUT_MODES:
            generator = batches.step_generator(job.train.seed, "rollout", step, self.dp_rank)
            prompts = [r.prompt_ids for r in records]
            return generate_rollout(self.models.student, prompts, job.model, job.diffusion,
                                    job.rollout, max_new_tokens=cap, slots=job.rollout.slots,
                                    generator=generator)  # fmt: skip
        return batches.given_responses(records, job, cap, device())

    def _rollout_step(self) -> list[dict[str, float]]:
        job, step = self.job, self.rollout_step
        cap = rollout_length_cap(step, job.curriculum, job.rollout.max_new_tokens,
                                 job.diffusion.block_size)  # fmt: skip
        records = [self.train_data[i] for i in self.order.next_local()]
        start = time.perf_counter()
        rollout = self._make_batch(records, cap)
        local_rows = job.train.prompts_per_rollout // self.dp_size
        x_t = batches.select_noisy_states(rollout, job, step, self.dp_rank * local_rows)
        rollout_time = time.perf_counter() - start
        rollout_tokens = collectives.all_reduce_value(
            int(rollout.response_valid.sum()), group=parallel_state.get_data_parallel_group()
        )
        local_batch = job.train.global_batch_size // self.dp_size
        history = []
        for k in range(self.steps_per_rollout):
            step_start = time.perf_counter()
            times = {"time_rollout": rollout_time if k == 0 else 0.0, "time_teacher": 0.0,
                     "time_student": 0.0, "time_optimizer": 0.0}  # fmt: skip
            micro = batches.pack_rows(rollout, x_t, job, k * local_batch, (k + 1) * local_batch)
            record = self._optimizer_step(micro, times)
            self.optimizer_step += 1
            elapsed = time.perf_counter() - step_start + rollout_time / self.steps_per_rollout
            record.update(times)
            record.update(
                rollout_step=step, length_cap=cap, rollout_tokens=int(rollout_tokens),
                tokens_per_second=record.get("loss_tokens", 0) / max(elapsed, 1e-9),
                memory_gib=memory_gib(),
            )  # fmt: skip
            if self.optimizer_step % self.job.train.log_interval == 0:
                self.logger.step_line(record, self.optimizer_step, self.total_steps)
            self.logger.scalars("train", record, self.optimizer_step)
            self.logger.record("train", record)
            history.append(record)
        return history

    # ---- the loop ----
    def trainer_state(self) -> dict:
        return {"optimizer_step": self.optimizer_step, "prompt_order": self.order.state_dict()}

    def save(self) -> str | None:
        if self.job.checkpoint.save_dir is None:
            return None
        start = time.perf_counter()
        path = checkpointing.save_checkpoint(
            self.job.checkpoint.save_dir, self.rollout_step, self.models.student,
            self.models.optimizer, self.trainer_state(), self.job,
        )  # fmt: skip
        self.last_save_seconds = time.perf_counter() - start
        return str(path)

    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        result = evaluate_kl(self.models, self.eval_data, self.job, self.dp_rank, self.dp_size)
        self.logger.scalars("eval", result, self.optimizer_step)
        self.logger.record("eval", {"rollout_step": self.rollout_step, **result})
        if is_rank0():
            log.info("eval at rollout step %d: mean KL %.4f over %d tokens", self.rollout_step,
                     result["kl"], result["loss_tokens"])  # fmt: skip
        return {"rollout_step": self.rollout_step, **result}

    def train(self) -> TrainResult:
        job = self.job
        result = TrainResult(self.rollout_step, self.optimizer_step, None)
        stop = self.stop
        try:
            if self.eval_data is not None and self.rollout_step == 0:
                result.evals.append(self.evaluate())
            last_step_seconds = 0.0
            while self.rollout_step < job.train.rollout_steps:
                start = time.perf_counter()
                result.history.extend(self._rollout_step())
                self.rollout_step += 1
                last_step_seconds = time.perf_counter() - start
                done = self.rollout_step == job.train.rollout_steps
                # A stop skips the evaluation: the time left goes to the checkpoint.
                if stop.should_stop(last_step_seconds, self.last_save_seconds) and not done:
                    result.stopped_early = stop.reason
                    log.info("stopping after rollout step %d: %s", self.rollout_step, stop.reason)
                    break
                interval = job.train.eval_interval
                if self.eval_data is not None and interval and self.rollout_step % interval == 0:
                    result.evals.append(self.evaluate())
                save_every = job.checkpoint.save_interval
                if save_every and self.rollout_step % save_every == 0 and not done:
                    result.checkpoint = self.save()
            if (
                self.eval_data is not None
                and result.stopped_early is None
                and (not job.train.eval_interval or self.rollout_step % job.train.eval_interval)
            ):
                result.evals.append(self.evaluate())
            result.checkpoint = self.save() or result.checkpoint
        finally:
            stop.uninstall()
            self.logger.close()
        result.rollout_step, result.optimizer_step = self.rollout_step, self.optimizer_step
        return result
