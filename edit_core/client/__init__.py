"""HTTP tooling around a ComfyUI server (no torch, no ComfyUI import): API workflows and their
batch edits, the tiny-model substitution, the UI format, the batch client, the server launcher
and the example run."""
