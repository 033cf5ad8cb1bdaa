"""The OPDLM trainer: interleaved on-policy rollout and distillation, colocated teacher/student.

Per rollout step s (prompts_per_rollout prompts over all DP ranks):
  prompts (DP-sharded) -> x0: the student's own rollout (opdlm, opdlm_off) or the data's
  responses (offpolicy, mdlm_sft), cut at the curriculum's cap L_s -> x_t: states from the step map
  (opdlm) or random masks (baselines) -> prompts_per_rollout / global_batch_size optimizer steps,
  each: one forward-backward schedule over the PP micro-batches in which each micro-batch's
  teacher targets are made and read by its student loss (training/steps.py) -> finite checks on
  the teacher targets, loss and gradient norm -> optimizer step.
Stops (signal, deadline, STOP file) are agreed before each rollout block, after the rollout,
between optimizer steps and at the end of a rollout step (training/preemption.py); the last
consistent state is then saved and the run exits with EXIT_RESUME (or EXIT_FINISHED for STOP).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron.core import parallel_state

from megatron_opdlm import config_base
from megatron_opdlm.config import JobConfig
from megatron_opdlm.data.prompts import PromptOrder
from megatron_opdlm.diffusion.engine import RolloutAborted, generate_rollout
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.distributed import device, is_rank0
from megatron_opdlm.runtime.logging import get_logger
from megatron_opdlm.training import batches, checkpointing, reshard, setup
from megatron_opdlm.training.evaluate import evaluate_kl
from megatron_opdlm.training.metrics import StepLogger, memory_gib, reduce_loss_metrics
from megatron_opdlm.training.optimizer import grad_norm_then_step, set_learning_rate
from megatron_opdlm.training.preemption import StopPoints
from megatron_opdlm.training.resilience import StopRequest, check_finite, is_finite
from megatron_opdlm.training.schedules import learning_rate, rollout_length_cap
from megatron_opdlm.training.steps import run_step

log = get_logger("training")


@dataclass
class TrainResult:
    rollout_step: int
    optimizer_step: int
    stopped_early: str | None  # the stop reason, None when all steps ran
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per optimizer step
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    resumable: bool = False  # stopped by a signal or the deadline: run again to continue


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
        # A dp_reshardable checkpoint of another tp/pp: its fully_reshardable copy (made once).
        self.resume_from = reshard.convert_if_needed(self.resume_from, job)
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
        self.stop_points = StopPoints(self.stop, job.train.run_dir)
        # Optimizer steps done of the current rollout step, and its batch (a mid-step stop).
        self.within_step, self.partial = 0, None
        # An evaluation is owed: the initial one, or the one a stop at a step's end skipped.
        self.eval_pending = self.eval_data is not None
        self.saved_state = None  # (rollout_step, within_step) of the newest checkpoint written
        self.writer = checkpointing.CheckpointWriter(job.checkpoint.async_save)
        self.last_save_time = time.monotonic()
        if self.resume_from is not None:
            state = checkpointing.load_checkpoint(
                self.resume_from, self.models.student, self.models.optimizer, job
            )
            self.rollout_step = state["rollout_step"]
            self.optimizer_step = state["optimizer_step"]
            self.order.load_state_dict(state["prompt_order"])
            self.within_step = state.get("within_step", 0)
            self.partial = state.get("partial_rollout")
            self.eval_pending = self.eval_data is not None and state.get("eval_pending", False)
            save_dir = job.checkpoint.save_dir
            if (
                save_dir is not None
                and self.resume_from.parent.resolve() == Path(save_dir).resolve()
            ):
                self.saved_state = (self.rollout_step, self.within_step)  # already there
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
        # Teacher targets are made and read per micro-batch inside the student's schedule.
        teacher = self.models.teacher if job.distill.mode != "mdlm_sft" else None
        start = time.perf_counter()
        set_learning_rate(self.models.optimizer, record["lr"])
        for chunk in self.models.student:
            chunk.zero_grad_buffer()
        self.models.optimizer.zero_grad()
        output = run_step(self.models.student, teacher, micro_batches, job, tokens, sequences)
        times["time_forward_backward"] = time.perf_counter() - start
        # A non-finite target skips (or stops) the step before its gradients are used; the
        # next step zeroes the gradient buffers first.
        if not check_finite("teacher log-probs", output.teacher_finite, step, policy):
            return {**record, "skipped": 1.0}
        metric_dicts = output.metrics
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
            should_abort = self.stop_points.rollout_abort_check(
                self.last_save_seconds, parallel_state.get_model_parallel_group()
            )
            try:
                return generate_rollout(self.models.student, prompts, job.model, job.diffusion,
                                        job.rollout, max_new_tokens=cap, slots=job.rollout.slots,
                                        generator=generator, should_abort=should_abort)  # fmt: skip
            except RolloutAborted:
                return None
        return batches.given_responses(records, job, cap, device())

    def _new_rollout(self, cap: int):
        """(rollout, x_t, rollout_tokens, rollout_time), or None after an agreed stop.

        A stop drops the partial rollout and restores the prompt order and RNG states of the
        step's start, so the checkpoint saved next replays this step exactly on resume.
        """
        job, step = self.job, self.rollout_step
        order_state, rng_state = self.order.state_dict(), checkpointing.capture_rng_state()
        records = [self.train_data[i] for i in self.order.next_local()]
        start = time.perf_counter()
        rollout = self._make_batch(records, cap)
        # All ranks agree here (DP groups may have decoded different numbers of blocks).
        if self.stop_points.agree(0.0, self.last_save_seconds, extra=rollout is None):
            self.order.load_state_dict(order_state)
            checkpointing.restore_rng_state(rng_state)
            log.info("rollout step %d dropped (%s)", step, self.stop_points.reason)
            return None
        local_rows = job.train.prompts_per_rollout // self.dp_size
        x_t = batches.select_noisy_states(rollout, job, step, self.dp_rank * local_rows)
        rollout_time = time.perf_counter() - start
        rollout_tokens = collectives.all_reduce_value(
            int(rollout.response_valid.sum()), group=parallel_state.get_data_parallel_group()
        )
        return {"rollout": rollout, "x_t": x_t, "rollout_tokens": rollout_tokens,
                "rollout_time": rollout_time}  # fmt: skip

    def _rollout_step(self) -> tuple[list[dict[str, float]], bool]:
        """This rollout step's optimizer steps; (history, True) when a stop cut it short."""
        job, step = self.job, self.rollout_step
        cap = rollout_length_cap(step, job.curriculum, job.rollout.max_new_tokens,
                                 job.diffusion.block_size)  # fmt: skip
        batch, first = self.partial, self.within_step  # a step resumed half-way
        self.partial, self.within_step = None, 0
        if batch is None:
            batch, first = self._new_rollout(cap), 0
            if batch is None:
                return [], True
        rollout, x_t, rollout_time = batch["rollout"], batch["x_t"], batch["rollout_time"]
        rollout_tokens = batch["rollout_tokens"]
        local_batch = job.train.global_batch_size // self.dp_size
        history = []
        for k in range(first, self.steps_per_rollout):
            step_start = time.perf_counter()
            times = {"time_rollout": rollout_time if k == 0 else 0.0,
                     "time_forward_backward": 0.0, "time_optimizer": 0.0}  # fmt: skip
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
            last = k + 1 == self.steps_per_rollout
            step_seconds = time.perf_counter() - step_start
            if not last and self.stop_points.agree(step_seconds, self.last_save_seconds):
                self.within_step, self.partial = k + 1, batch  # saved with the checkpoint
                return history, True
        return history, False

    # ---- the loop ----
    def trainer_state(self) -> dict:
        return {"optimizer_step": self.optimizer_step, "prompt_order": self.order.state_dict(),
                "within_step": self.within_step, "eval_pending": self.eval_pending}  # fmt: skip

    def save(self, wait: bool = True) -> str | None:
        """Save the current state; `wait=False` lets an async save finish in the background."""
        if self.job.checkpoint.save_dir is None:
            return None
        name = checkpointing.iteration_name(self.rollout_step, self.within_step)
        if self.saved_state == (self.rollout_step, self.within_step):
            # Already on disk (a stop right after a save, or a resumed run that had no step
            # left): re-writing it would only spend the stop's time window.
            return str(Path(self.job.checkpoint.save_dir).absolute() / name)
        start = time.perf_counter()
        path = self.writer.save(
            self.job.checkpoint.save_dir, self.rollout_step, self.models.student,
            self.models.optimizer, self.trainer_state(), self.job,
            within_step=self.within_step, partial_rollout=self.partial,
        )  # fmt: skip
        if wait:
            self.writer.finalize()
        self.last_save_seconds = time.perf_counter() - start  # async: the blocking part only
        self.last_save_time = time.monotonic()
        self.saved_state = (self.rollout_step, self.within_step)
        return str(path)

    def _save_due(self, done: bool) -> bool:
        """Step interval or wall-clock interval (rank 0's clock decides for all); collective."""
        if done or self.job.checkpoint.save_dir is None:
            return False
        ckpt = self.job.checkpoint
        if ckpt.save_interval and self.rollout_step % ckpt.save_interval == 0:
            return True
        if not ckpt.save_interval_minutes:
            return False
        waited = time.monotonic() - self.last_save_time
        late = collectives.group_rank() == 0 and waited >= ckpt.save_interval_minutes * 60
        return collectives.any_rank(late)

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
        stop, points = self.stop, self.stop_points
        try:
            if self.eval_pending and self.within_step == 0:
                result.evals.append(self.evaluate())  # the initial one, or the one a stop owed
                self.eval_pending = False
            last_step_seconds = 0.0
            while self.rollout_step < job.train.rollout_steps:
                start = time.perf_counter()
                history, cut_short = self._rollout_step()
                result.history.extend(history)
                if cut_short:
                    result.stopped_early = points.reason
                    log.info("stopping in rollout step %d after %d of its optimizer steps: %s",
                             self.rollout_step, self.within_step, points.reason)  # fmt: skip
                    break
                self.rollout_step += 1
                last_step_seconds = time.perf_counter() - start
                done = self.rollout_step == job.train.rollout_steps
                interval = job.train.eval_interval
                eval_due = bool(self.eval_data is not None and interval
                                and self.rollout_step % interval == 0)  # fmt: skip
                # A stop skips the evaluation (the time left goes to the checkpoint); the
                # resumed run owes it and runs it first.
                if not done and points.agree(last_step_seconds, self.last_save_seconds):
                    result.stopped_early = points.reason
                    self.eval_pending = eval_due
                    log.info("stopping after rollout step %d: %s", self.rollout_step, points.reason)
                    break
                if eval_due:
                    result.evals.append(self.evaluate())
                self.writer.poll()  # an async save completes (renamed, `latest`) once written
                if self._save_due(done):
                    result.checkpoint = self.save(wait=False)
            if (
                self.eval_data is not None
                and result.stopped_early is None
                and (not job.train.eval_interval or self.rollout_step % job.train.eval_interval)
            ):
                result.evals.append(self.evaluate())
            result.checkpoint = self.save() or result.checkpoint
            if result.stopped_early is not None:
                result.resumable = points.resumable
                since = points.seconds_since_signal()
                if since is not None and result.checkpoint is not None:
                    log.info("signal to checkpoint on disk: %.2f s (%s)", since, result.checkpoint)
        finally:
            # An async save in flight is completed before exit (dropped if an error unwinds).
            self.writer.close(abort=sys.exc_info()[0] is not None)
            stop.uninstall()
            self.logger.close()
        result.rollout_step, result.optimizer_step = self.rollout_step, self.optimizer_step
        return result
