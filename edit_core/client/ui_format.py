"""UI-format workflows (what the editor and the template browser open) from API graphs and
back. The conversion needs each node's input order, which comes from GET /object_info."""
from collections import defaultdict
from typing import Iterable, List

from .workflow import Graph, WorkflowError, is_link


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

