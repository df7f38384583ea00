"""What a user would do instead of EDiT at the same speed-up, on the same teacher, captions
and noise as the students:

- **fewer steps**: the teacher sampled with ``round(steps / speed-up)`` steps (at least 1);
- **LazyCache**: ComfyUI's own step cache (``comfy_extras.nodes_easycache.LazyCacheNode``, as
  the node applies it), with the reuse threshold that skips the share of model calls the
  speed-up asks for, found by bisection on a few captions. Where even its largest threshold
  skips less, it is measured at that threshold and its reached speed-up is what is reported.
  (EasyCache wraps ``DIFFUSION_MODEL``, which ComfyUI's SD3 and PixArt models do not run
  through in this host, so it would skip nothing for these families.)

A speed-up here is model calls saved: the sampler's other work is the same for all.
"""
import dataclasses
from contextlib import contextmanager
from typing import Dict, List

from .study import Samples, StudySettings
from .teacher import Teacher

LAZYCACHE_MAX_THRESHOLD = 3.0  # the node's own maximum
LAZYCACHE_SEARCH_CAPTIONS = 4
LAZYCACHE_SEARCH_ROUNDS = 6


@contextmanager
def counted_calls(patcher):
    """Counts the diffusion model's forward calls while inside (CFG's rows run as one call)."""
    calls: List[int] = []
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def fewer_steps(teacher: Teacher, captions: List[str], settings: StudySettings, speedup: float) -> Dict:
    steps = min(settings.sample_steps, max(1, round(settings.sample_steps / speedup)))
    samples = Samples(teacher, teacher.patcher, captions, dataclasses.replace(settings, sample_steps=steps))
    return {"title": f"teacher, {steps} steps", "label": f"{steps} steps", "steps": steps,
            "speedup": settings.sample_steps / steps, "samples": samples}


def lazycache_model(patcher, threshold: float):
    from comfy_extras.nodes_easycache import LazyCacheNode
    return LazyCacheNode.execute(patcher, threshold, 0.15, 0.95, False).result[0]


def lazycache(teacher: Teacher, captions: List[str], settings: StudySettings, speedup: float) -> Dict:
    """LazyCache at the threshold whose share of model calls is closest to 1 / ``speedup``
    (not above it where that can be reached)."""
    def calls_share(threshold: float, names: List[str]):
        model = lazycache_model(teacher.patcher, threshold)
        with counted_calls(teacher.patcher) as calls:
            samples = Samples(teacher, model, names, settings)
        return len(calls) / (len(names) * len(settings.image_px) * settings.sample_steps), samples

    probe = captions[:LAZYCACHE_SEARCH_CAPTIONS]
    target = 1 / speedup
    lo, hi = 0.0, LAZYCACHE_MAX_THRESHOLD
    if calls_share(hi, probe)[0] > target:
        threshold = hi  # cannot skip enough: measured at its most aggressive
    else:
        for _ in range(LAZYCACHE_SEARCH_ROUNDS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if calls_share(mid, probe)[0] > target else (lo, mid)
        threshold = hi
    share, samples = calls_share(threshold, captions)
    return {"title": f"LazyCache, threshold {threshold:.3f}", "label": "LazyCache", "threshold": threshold,
            "calls_share": share,
            "speedup": 1 / share, "samples": samples}
