"""Research tooling beside the product: speed benchmarks, the fidelity study and the
distillation checks. It imports edit_core; nothing in edit_core or nodes imports it."""
