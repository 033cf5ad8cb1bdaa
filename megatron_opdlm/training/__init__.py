"""Training: the OPDLM trainer loop, its optimizer, schedules, checkpoints and resilience."""
