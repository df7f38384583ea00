"""Checks of distillation at real sizes and on tiny teachers: the benchmark, the full-size and
step-memory checks, and the evaluation helpers they share with the fidelity study."""
