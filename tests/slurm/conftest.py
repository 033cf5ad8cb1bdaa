"""The `slurm` marker: tests that submit the recipes of examples/slurm to a real SLURM."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: submits jobs to a real SLURM (skipped without sbatch / SLURM_CONF)"
    )
