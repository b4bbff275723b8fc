"""Measurement: `step` (reca bench step: throughput, MFU, GPU-hours beside the reference mode),
`batch` (the largest micro-batch that trains), `flops` (the analytic FLOP count), `info`
(parameter counts on the meta device)."""
