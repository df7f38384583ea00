"""How much memory and disk a distillation needs, known before it starts.

    python -m edit_core.distill.plan --model sd35-medium --resolutions 512 1024 2048 \\
        --batch-size 1 --mode layerwise+e2e --device-memory 24GiB

The model's architecture is built at full depth and width through ComfyUI's own classes
under PyTorch's FakeTensorMode (shapes and dtypes, no data, nothing computed), patched with
an EDiT bank, and one teacher pass and one training step run on it while
``PeakTensorMemory`` counts the bytes of every live tensor. The peak of a step is what is
resident (weights, bank, AdamW state) plus the largest amount the step holds at once
(activations, captured layer tensors, gradients, optimizer temporaries).

Self-attention is measured with PyTorch's fused attention (ComfyUI's "pytorch" attention,
what it uses on CUDA): it never forms the N x N score matrix. Not counted: the CUDA context
and allocator fragmentation (``--reserve``, default 1 GiB, is kept free for them), kernel
workspaces. ``check_fits`` is what the node and the distill CLI call before any work.
"""
from .harness import GiB, MiB, Measured, PlanModel, fake_model, gib, measure, parse_bytes
from .search import Plan, Row, check_fits, device_budget, make_plan

__all__ = ["GiB", "MiB", "Measured", "Plan", "PlanModel", "Row", "check_fits", "device_budget", "fake_model", "gib",
           "make_plan", "measure", "parse_bytes"]
