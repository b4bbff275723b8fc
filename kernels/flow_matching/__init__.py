"""`flow_matching_noise` and `flow_matching_loss`: rectified-flow interpolation and its MSE.
`kernel.py` (Triton; imports triton) and `reference.py` (torch)."""
