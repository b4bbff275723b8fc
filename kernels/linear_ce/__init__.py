"""`linear_cross_entropy`: LM head + cross-entropy without materialising the logits.
`kernel.py` (Triton; imports triton) and `reference.py` (torch)."""
