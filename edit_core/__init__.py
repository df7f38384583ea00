"""ComfyUI-EDiT's core, importable without a running server.

    attention/  the math: EDiT linear compressed attention, the MM-EDiT hybrid, float64 references
    bank/       the per-layer weight bank, its design options and its safetensors file
    comfyui/    where ComfyUI's models are patched: SD3/SD3.5 and PixArt adapters, the patcher, architectures
    distill/    distillation from the user's own model: settings, teacher data, training, plan
    client/     HTTP tooling around a ComfyUI server: workflows, batch runs, the example run
    fixtures/   built-in tiny models written from a seed
    util/       safetensors I/O, tensor-memory counting, plots, command-line helpers

attention/, bank/ and util/ never import ComfyUI; client/ imports neither ComfyUI nor torch
(tests/project/test_boundaries.py). distill/ and fixtures/ also call ComfyUI directly: its
samplers and model loaders, which are the point of distilling the user's own model.
"""
