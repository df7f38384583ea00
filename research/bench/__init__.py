"""EDiT benchmark at the real widths of SD3.5-Medium and PixArt-Sigma.

``python -m research.bench --help`` for the command line; ``run.run_benchmark`` from Python
(after ``edit_core.comfyui.env.setup_comfy()``). Importing this package loads nothing.
"""
