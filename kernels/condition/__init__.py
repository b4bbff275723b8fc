"""`condition`: token embedding + visual-prompt scatter (+ gradient scale), one pass.
`kernel.py` (Triton; imports triton) and `reference.py` (torch)."""
