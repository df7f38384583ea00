"""Distillation: teacher -> EDiT bank. ``distill`` (train.py) is the entry point; the CLI is
``python -m edit_core.distill`` (__main__.py); the ComfyUI node is nodes/distill_node.py."""
