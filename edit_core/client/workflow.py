"""API-format workflows (what POST /prompt takes) as data: loading and checking them, and the
edits batch runs make (prompt, seed, size, EDiT on/off).

An API graph maps node id -> {"class_type", "inputs", "_meta": {"title"}}; an input is a
value or a link ``[node_id, output_slot]``. No ComfyUI import here.
"""
import copy
import json
from pathlib import Path
from typing import Dict, List, Optional

Graph = Dict[str, dict]


class WorkflowError(ValueError):
    pass


def load_graph(path) -> Graph:
    """An API-format workflow file, checked (``check_graph``); anything else gets a clear error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkflowError(f"{path}: not a readable JSON workflow ({e})") from e
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise WorkflowError(f"{path} is a UI-format workflow; batch runs need the API format "
                            "(workflows/api/, or 'Export (API)' in ComfyUI)")
    check_graph(data, str(path))
    return data


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# Inputs the batch edits read, per node type: a workflow without them cannot be run here.
NEEDED_INPUTS = {"KSampler": ("steps",), "KSamplerAdvanced": ("steps",), "CLIPTextEncode": ("text",),
                 "EDiTDistill": ("sample_steps",)}


REEXPORT = "fix the node, or export the workflow again with 'Export (API)' in ComfyUI"


def check_graph(graph, source: str = "the workflow"):
    """Refuse what is not an API-format graph, naming the node and what is wrong: a node
    without class_type or inputs, a link to a node that is not there, a sampler without
    steps. (Everything else the server checks when the prompt is queued.)"""
    if not isinstance(graph, dict) or not graph:
        raise WorkflowError(f"{source}: expected an API-format workflow, a JSON object of nodes "
                            "(node id -> {\"class_type\", \"inputs\"}), found " +
                            ("an empty object" if isinstance(graph, dict) else f"a JSON {type(graph).__name__}") +
                            "; export the workflow with 'Export (API)' in ComfyUI")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise WorkflowError(f"{source}: node {node_id} has no class_type: not an API-format workflow node; "
                                f"{REEXPORT}")
        where = f"{source}: node {node_id} ({node['class_type']})"
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            found = "" if inputs is None else f" (found a JSON {type(inputs).__name__})"
            raise WorkflowError(f"{where} has no 'inputs' object{found}; {REEXPORT}")
        for name, value in inputs.items():
            if is_link(value) and value[0] not in graph:
                raise WorkflowError(f"{where}: input {name!r} links to node {value[0]}, which is not in the "
                                    f"workflow; {REEXPORT}")
        missing = [k for k in NEEDED_INPUTS.get(node["class_type"], ()) if k not in inputs]
        if missing:
            raise WorkflowError(f"{where} has no {', '.join(repr(k) for k in missing)} input; {REEXPORT}")


def nodes_of(graph: Graph, *class_types: str) -> List[str]:
    return [i for i, n in graph.items() if n["class_type"] in class_types]


# -- edits for batch runs -------------------------------------------------------------------
SAMPLERS = ("KSampler", "KSamplerAdvanced")
SEED_INPUTS = ("seed", "noise_seed")
LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")
TEXT_NODES = ("CLIPTextEncode", "EDiTRandomConditioning")


def positive_text_nodes(graph: Graph) -> List[str]:
    """The text nodes feeding the samplers' ``positive`` inputs."""
    found = []
    for i in nodes_of(graph, *SAMPLERS):
        link = graph[i]["inputs"].get("positive")
        if is_link(link) and graph[link[0]]["class_type"] in TEXT_NODES and link[0] not in found:
            found.append(link[0])
    return found


def with_settings(graph: Graph, prompt: Optional[str] = None, seed: Optional[int] = None,
                  size: Optional[tuple] = None, edit: Optional[bool] = None) -> Graph:
    """A copy with the positive prompt, sampler seed, image size (width, height) and Apply
    EDiT's switch set wherever the graph has them; a setting the graph has no place for is
    an error (it would silently do nothing)."""
    g = copy.deepcopy(graph)
    looked_for = {"prompt": TEXT_NODES, "seed": SAMPLERS, "size": LATENTS, "edit": ("ApplyEDiT",)}
    targets = {
        "prompt": [(i, "text") for i in positive_text_nodes(g)],
        "seed": [(i, k) for i in nodes_of(g, *SAMPLERS) for k in SEED_INPUTS if k in g[i]["inputs"]],
        "size": [(i, None) for i in nodes_of(g, *LATENTS)],
        "edit": [(i, "enabled") for i in nodes_of(g, "ApplyEDiT")],
    }
    for name, value in (("prompt", prompt), ("seed", seed), ("size", size), ("edit", edit)):
        if value is None:
            continue
        if not targets[name]:
            raise WorkflowError(f"the workflow has no place for the {name}: no {' / '.join(looked_for[name])} node")
        for i, key in targets[name]:
            if name == "size":
                g[i]["inputs"]["width"], g[i]["inputs"]["height"] = int(size[0]), int(size[1])
            else:
                g[i]["inputs"][key] = value
    return g

