"""An API workflow moved onto the built-in tiny models (``fixtures.tiny_models``), so any
example runs without real checkpoints."""
import copy
from typing import Optional

from ..fixtures.names import TINY_BANKS, TINY_PIXART, TINY_SD35, TINY_VAE4, TINY_VAE16
from .workflow import LATENTS, SAMPLERS, Graph, WorkflowError, is_link, nodes_of


def graph_family(graph: Graph) -> str:
    """'sd3' or 'pixart', from the text encoders or latent the graph uses."""
    if nodes_of(graph, "TripleCLIPLoader", "EmptySD3LatentImage", "CheckpointLoaderSimple"):
        return "sd3"
    if any(graph[i]["inputs"].get("type") == "pixart" for i in nodes_of(graph, "CLIPLoader")):
        return "pixart"
    raise WorkflowError("cannot tell the model family (SD3.5 or PixArt-Sigma) of this workflow for the tiny models")


def use_tiny_models(graph: Graph, size: int = 512, steps: int = 4, family: Optional[str] = None) -> Graph:
    """The same graph on the built-in tiny models (written by ``tiny_models.write_tiny_models``):
    tiny diffusion model, VAE and EDiT bank; seeded random conditioning in place of the text
    encoders (the images follow no prompt); small sizes and few steps."""
    family = family or graph_family(graph)
    unet, vae = (TINY_SD35, TINY_VAE16) if family == "sd3" else (TINY_PIXART, TINY_VAE4)
    text = dict(tokens=154, context_dim=4096, pooled_dim=2048 if family == "sd3" else 0)
    g = copy.deepcopy(graph)
    next_id = max((int(i) for i in g if i.isdigit()), default=0) + 1

    def relink(old, new):
        for node in g.values():
            for k, v in node["inputs"].items():
                if v == old:
                    node["inputs"][k] = new

    for i, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple":
            g[i] = _node("UNETLoader", node, unet_name=unet, weight_dtype="default")
            g[str(next_id)] = _node("VAELoader", None, vae_name=vae)
            relink([i, 2], [str(next_id), 0])
            next_id += 1
        elif ct == "UNETLoader":
            inp["unet_name"] = unet
        elif ct == "VAELoader":
            inp["vae_name"] = vae
        elif ct == "EDiTLoader":
            inp["edit_name"] = TINY_BANKS[family]
        elif ct == "CLIPTextEncode":
            g[i] = _node("EDiTRandomConditioning", node, text=inp["text"], seed=0, **text)
        elif ct in LATENTS:
            inp["width"] = inp["height"] = size
        elif ct in SAMPLERS:
            inp["steps"] = min(inp["steps"], steps)
        elif ct == "EDiTSpeedTest":
            inp.update(width=size, height=size, repeats=1)
        elif ct == "EDiTDistill":
            inp.update(resolutions=str(size), sample_steps=min(inp["sample_steps"], steps), train_steps=4,
                       batch_size=2, seeds="0,1")
            if "clip" in inp:  # conditioning straight from the prompts instead
                for key, txt in (("positive", inp["prompts"]), ("negative", inp["negative_prompt"])):
                    g[str(next_id)] = _node("EDiTRandomConditioning", None, text=txt, seed=0, **text)
                    inp[key] = [str(next_id), 0]
                    next_id += 1
                del inp["clip"]
    for i in [i for i, n in g.items() if n["class_type"] in ("TripleCLIPLoader", "CLIPLoader", "DualCLIPLoader")]:
        del g[i]
    dangling = [(i, k) for i, n in g.items() for k, v in n["inputs"].items() if is_link(v) and v[0] not in g]
    if dangling:
        raise WorkflowError(f"inputs still linked to the removed text encoders: {dangling}")
    return g


def _node(class_type: str, old: Optional[dict], **inputs) -> dict:
    """A replacement node keeping the old one's title (the tiny stand-ins need no links)."""
    title = (old or {}).get("_meta", {}).get("title", class_type)
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
