"""HTTP tooling around a ComfyUI server (no torch, no ComfyUI import): workflow files, the
batch client, the server launcher and the example run."""
