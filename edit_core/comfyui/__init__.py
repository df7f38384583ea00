"""The only seam with ComfyUI: its environment, its SD3/SD3.5 and PixArt model classes, the
patcher that puts EDiT layers into them, the real architectures and the speed test."""
