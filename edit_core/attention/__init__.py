"""The attention math: EDiT linear compressed attention and the MM-EDiT hybrid (torch only,
no ComfyUI). functional.py holds the one read-out the layers use, layers.py the trainable
layers, reference.py the float64 N x N oracle the tests hold both against."""
