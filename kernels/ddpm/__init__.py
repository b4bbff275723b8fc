"""`ddpm_loss`: MAR's diffusion-head loss (epsilon MSE + learned-sigma bound); `schedule.py`
holds the DDPM tables. `kernel.py` (Triton; imports triton) and `reference.py` (torch)."""
