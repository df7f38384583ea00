"""ComfyUI workflows as data: API-format graphs (what POST /prompt takes), their UI-format
twins (what the editor and the template browser open), and the edits batch runs make.

An API graph maps node id -> {"class_type", "inputs", "_meta": {"title"}}; an input is a
value or a link ``[node_id, output_slot]``. Converting between the formats needs each node's
input order, which comes from GET /object_info. No ComfyUI import here.
"""
import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from ..fixtures.names import TINY_BANKS, TINY_PIXART, TINY_SD35, TINY_VAE4, TINY_VAE16

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


# -- the built-in tiny models ---------------------------------------------------------------
def graph_family(graph: Graph) -> str:
    """'sd35' or 'pixart', from the text encoders or latent the graph uses."""
    if nodes_of(graph, "TripleCLIPLoader", "EmptySD3LatentImage", "CheckpointLoaderSimple"):
        return "sd35"
    if any(graph[i]["inputs"].get("type") == "pixart" for i in nodes_of(graph, "CLIPLoader")):
        return "pixart"
    raise WorkflowError("cannot tell the model family (SD3.5 or PixArt-Sigma) of this workflow for the tiny models")


def use_tiny_models(graph: Graph, size: int = 512, steps: int = 4, family: Optional[str] = None) -> Graph:
    """The same graph on the built-in tiny models (written by ``tiny_models.write_tiny_models``):
    tiny diffusion model, VAE and EDiT bank; seeded random conditioning in place of the text
    encoders (the images follow no prompt); small sizes and few steps."""
    family = family or graph_family(graph)
    unet, vae = (TINY_SD35, TINY_VAE16) if family == "sd35" else (TINY_PIXART, TINY_VAE4)
    text = dict(tokens=154, context_dim=4096, pooled_dim=2048 if family == "sd35" else 0)
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


# -- UI format ------------------------------------------------------------------------------
def _inputs(spec: dict) -> List[tuple]:
    """(name, type, options) in the editor's order: required, then optional."""
    order = spec.get("input_order") or {s: list(spec["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec["input"][section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 else {}))
    return out


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _has_control(kind, options) -> bool:
    return kind in ("INT", "FLOAT") and bool(options.get("control_after_generate"))


def api_to_ui(graph: Graph, object_info: dict, notes: Iterable[str] = ()) -> dict:
    """The UI-format twin of an API graph: nodes laid out in columns by depth, links, widget
    values in the editor's order (seed widgets followed by their 'fixed' control); ``notes``
    become Note nodes above the graph."""
    missing = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if missing:
        raise WorkflowError(f"unknown node types {missing}")
    if not all(i.isdigit() for i in graph):
        raise WorkflowError("UI workflows need numeric node ids")
    ids = {k: int(k) for k in graph}
    depth = {}

    def level(i):
        if i not in depth:
            ups = [level(v[0]) for v in graph[i]["inputs"].values() if is_link(v)]
            depth[i] = 1 + max(ups, default=-1)
        return depth[i]

    for i in graph:
        level(i)
    links, ui_nodes, out_links, rows = [], {}, defaultdict(list), defaultdict(int)
    for i in sorted(graph, key=lambda k: (depth[k], int(k))):
        node, spec = graph[i], object_info[graph[i]["class_type"]]
        inputs, widgets = [], []
        for name, kind, options in _inputs(spec):
            value = node["inputs"].get(name)
            if is_link(value):
                links.append([len(links) + 1, ids[value[0]], value[1], ids[i], len(inputs), None])
                out_links[(value[0], value[1])].append(len(links))
                inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO",
                               "link": len(links)})
            elif _is_widget(kind):
                if value is None:
                    value = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                widgets.append(value)
                if _has_control(kind, options):
                    widgets.append("fixed")
            elif name in spec["input"].get("required", {}):
                raise WorkflowError(f"node {i} ({node['class_type']}): required input {name!r} is not linked")
            else:
                inputs.append({"name": name, "type": kind, "link": None})
        col, row = depth[i], rows[depth[i]]
        rows[col] += 1
        ui_nodes[i] = {"id": ids[i], "type": node["class_type"], "pos": [40 + 380 * col, 200 + 260 * row],
                       "size": [340, 200], "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": inputs,
                       "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
                       "widgets_values": widgets}
        title = node.get("_meta", {}).get("title")
        if title and title != spec.get("display_name", node["class_type"]):
            ui_nodes[i]["title"] = title
    by_ui = {ids[k]: k for k in ids}
    for link in links:
        link[5] = object_info[graph[by_ui[link[1]]]["class_type"]]["output"][link[2]]
    for i, n in ui_nodes.items():
        spec = object_info[graph[i]["class_type"]]
        n["outputs"] = [{"name": name, "type": kind, "links": out_links.get((i, s), []), "slot_index": s}
                        for s, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))]
    nodes = list(ui_nodes.values())
    for k, text in enumerate(notes):
        nodes.append({"id": max(ids.values()) + k + 1, "type": "Note", "pos": [40 + 420 * k, -60], "size": [400, 220],
                      "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text]})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> Graph:
    """The API graph of a UI-format workflow (what the editor's 'Export (API)' writes);
    Note nodes and muted nodes are left out."""
    links = {link[0]: link for link in ui["links"]}
    graph = {}
    for n in ui["nodes"]:
        if n["type"] in ("Note", "MarkdownNote") or n.get("mode", 0) != 0:
            continue
        if n["type"] not in object_info:
            raise WorkflowError(f"node {n['id']}: unknown node type {n['type']!r}")
        inputs, linked = {}, {i["name"]: i.get("link") for i in n.get("inputs", [])}
        widgets = list(n.get("widgets_values") or [])
        for name, kind, options in _inputs(object_info[n["type"]]):
            if linked.get(name) is not None:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            if _is_widget(kind) and name not in linked:
                if not widgets:
                    raise WorkflowError(f"node {n['id']} ({n['type']}): no widget value for {name!r}")
                inputs[name] = widgets.pop(0)
                if _has_control(kind, options):
                    widgets.pop(0)
        graph[str(n["id"])] = {"class_type": n["type"], "inputs": inputs,
                               "_meta": {"title": n.get("title") or object_info[n["type"]].get("display_name", n["type"])}}
    return graph

