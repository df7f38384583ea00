"""Settings declared once, and the command-line flags and node widgets made from them.

A ``Setting`` says what one option is (default, help, choices, limits) and where it shows:
``cli`` names the argparse group of its ``--flag`` (None: not a flag), ``node`` holds the
widget's options (None: not a widget). A dataclass declares its settings as field metadata
(``setting_field``); a plain table is a tuple of ``Setting``s. No ComfyUI here: the node
widgets are the plain ``(type, options)`` pairs of ``INPUT_TYPES``.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

WIDGET_TYPES = {int: "INT", float: "FLOAT", str: "STRING", bool: "BOOLEAN"}


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    help: str
    kind: type = str                       # int, float or str; a list setting is typed as text
    choices: Optional[Sequence] = None
    text: Optional[str] = None             # a list setting's default as typed (e.g. "512"), read by ``parse``
    parse: Optional[Callable] = None       # typed text (a string or a flag's words) -> the value
    cli: Optional[str] = None              # the argparse group's key; None: no flag
    node: Optional[Mapping] = None         # widget options (name, default, choices, min, max...); None: no widget

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def widget(self) -> str:
        return (self.node or {}).get("name", self.name)


def setting_field(default, help: str, **declared):
    """A dataclass field declaring its Setting (the name and kind come from the field)."""
    return field(default=default, metadata={"setting": dict(help=help, **declared)})


def settings_of(cls) -> Tuple[Setting, ...]:
    """The Settings a dataclass declares, in field order."""
    return tuple(Setting(f.name, f.default, kind=f.type if f.type in WIDGET_TYPES else str, **f.metadata["setting"])
                 for f in dataclasses.fields(cls) if "setting" in f.metadata)


def add_flags(groups: Mapping[str, Any], settings: Iterable[Setting]):
    """Add each setting's ``--flag`` to ``groups[setting.cli]`` (argparse groups or parsers)."""
    for s in settings:
        if s.cli is None:
            continue
        options: Dict[str, Any] = {"help": s.help}
        if s.parse is not None:
            options.update(nargs="+", default=[s.text])
        else:
            options.update(type=s.kind, default=s.default)
        if s.choices is not None:
            options["choices"] = list(s.choices)
        groups[s.cli].add_argument(s.flag, **options)


def widgets(settings: Iterable[Setting], names: Sequence[str], choices: Optional[Mapping[str, Sequence]] = None
            ) -> Dict[str, tuple]:
    """``INPUT_TYPES`` entries of the named settings, in the order of ``names`` (the order of a
    node's widgets, which saved workflows depend on). ``choices``: lists only the host knows
    (e.g. ComfyUI's samplers), by setting name."""
    by_name = {s.name: s for s in settings}
    out = {}
    for name in names:
        s = by_name[name]
        options = dict(s.node)
        widget_name = options.pop("name", s.name)
        listed = (choices or {}).get(name, options.pop("choices", s.choices))
        default = options.pop("default", s.text if s.parse is not None else s.default)
        kind = list(listed) if listed is not None else WIDGET_TYPES[str if s.parse is not None else s.kind]
        out[widget_name] = (kind, {"default": default, **options})
    return out


def values_from(settings: Iterable[Setting], given: Mapping[str, Any], by: str = "name") -> Dict[str, Any]:
    """The settings' values from a flag namespace's ``vars`` (by="name") or a node's keyword
    arguments (by="widget"); list settings parsed. Settings not given are left out."""
    out = {}
    for s in settings:
        key = s.widget if by == "widget" else s.name
        if key in given:
            out[s.name] = s.parse(given[key]) if s.parse is not None else given[key]
    return out
