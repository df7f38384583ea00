"""Checks that a saved image is a real picture: what the tiny VAE decodes from a sampled
latent is seeded colour, never black (the NaN decode of an uninitialised VAE) or flat."""
from pathlib import Path

import numpy as np
from PIL import Image


def assert_real_image(path) -> np.ndarray:
    """The image as floats in [0, 1], after checking it is neither black nor one flat colour."""
    path = Path(path)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    mean, std = float(pixels.mean()), float(pixels.std())
    assert 0.05 < mean < 0.95 and std > 0.03, f"{path.name}: mean {mean:.3f}, std {std:.3f}"
    return pixels
