"""Submitting the recipes of examples/slurm and watching their jobs (scontrol, sacct, the logs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV_FILE = REPO / "examples" / "slurm" / "envs" / "cpu_tiny.env"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}  # fmt: skip


def slurm_missing() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (.ci/run starts a localhost SLURM: tools/slurm_localhost)"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set (source $SLURM_LOCAL_DIR/env.sh after start.sh)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld does not answer: {ping.stdout.strip()} {ping.stderr.strip()}"
    return None


def accounting_missing() -> str | None:
    """Why `sacct` has no records here (SLURM runs without slurmdbd), or None."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    storage = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out.stdout, re.MULTILINE)
    if storage is None or storage.group(1) != "accounting_storage/slurmdbd":
        found = storage.group(1) if storage else f"unknown: {out.stderr.strip()}"
        return (
            f"SLURM runs without job accounting (AccountingStorageType {found}): no sacct "
            "records (tools/slurm_localhost/start.sh printed a WARNING saying why)"
        )
    return None


def sacct_runs(job: str) -> list[dict[str, str]]:
    """One record per run of the job, oldest first (-D keeps the runs a requeue ended; -X: the
    allocation only, no steps)."""
    fields = ["JobID", "State", "ExitCode", "Submit", "Start", "End"]
    command = ["sacct", "-j", job, "-D", "-X", "-n", "-P", f"--format={','.join(fields)}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return [dict(zip(fields, line.split("|"))) for line in out.stdout.splitlines() if line]


def job_env(work: Path, **extra: str) -> dict:
    launch = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("SLURM_")}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return {**env, "OPDLM_WORK": str(work), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            "OPDLM_REPO": str(REPO), **extra}  # fmt: skip


def submit(recipe: str, env: dict, log: Path, *sbatch_args: str) -> str:
    command = [str(REPO / "examples" / "slurm" / "submit.sh"), recipe, str(ENV_FILE),
               f"--output={log}", "--open-mode=append", *sbatch_args]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=log.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    info = {}
    for field in out.stdout.split():
        key, _, value = field.partition("=")
        info.setdefault(key, value)
    return info


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_final(job: str, log: Path, timeout: float = 600) -> dict[str, str]:
    def final():
        info = job_info(job)
        if "JobState" not in info:  # purged (MinJobAge) or never existed: no use waiting
            raise AssertionError(f"SLURM no longer knows job {job}")
        return info if info.get("JobState") in FINAL_STATES else None

    try:
        return wait_for(final, timeout, f"job {job} to end", interval=0.5)
    except AssertionError as exc:
        tail = log.read_text()[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"{exc}; state {job_info(job)}; log:\n{tail}") from None


def log_text(log: Path) -> str:
    return log.read_text() if log.exists() else ""
