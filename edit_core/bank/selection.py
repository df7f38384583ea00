"""The layer-selection syntax: which of a bank's layers a node or the CLI applies."""
import re
from typing import Optional, Sequence, Tuple

from ..errors import EDiTError

LAYER_SELECTION_SYNTAX = ("'all' (or blank), or comma-separated block indices and ranges such as '0-12, 20', each "
                          "optionally limited to one kind of layer with ':attn' or ':attn2' (e.g. '0-12:attn2')")
_SELECTION_ITEM = re.compile(r"([0-9]+)(?: *- *([0-9]+))?(?::(attn2?))?")  # ASCII digits only


def parse_layer_selection(selection: str) -> Optional[Tuple[Tuple[int, int, str], ...]]:
    """The (first block, last block, kind or '') items of a layer selection; None for all
    layers ('all', '' and spaces alike). Anything else is an EDiTError showing the syntax."""
    text = (selection or "").strip()
    if text.lower() in ("", "all"):
        return None
    items = []
    for part in text.split(","):
        match = _SELECTION_ITEM.fullmatch(part.strip())
        if not match:
            what = "an empty item" if not part.strip() else f"{part.strip()!r}"
            raise EDiTError(f"layer selection {selection!r}: {what} is not a block index or range; "
                            f"write {LAYER_SELECTION_SYNTAX}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise EDiTError(f"layer selection {selection!r}: the range {part.strip()!r} runs backwards; "
                            f"write it low-high ('{last}-{first}')")
        items.append((first, last, match[3] or ""))
    return tuple(items)


def select_layers(config_layers: Sequence[str], selection: str) -> Tuple[str, ...]:
    """The bank layers a selection (see ``parse_layer_selection``) picks, in bank order."""
    items = parse_layer_selection(selection)
    if items is None:
        return tuple(config_layers)
    chosen = [name for name in config_layers
              if any(first <= int(name.split(".")[1]) <= last and (not kind or name.endswith("." + kind))
                     for first, last, kind in items)]
    if not chosen:
        raise EDiTError(f"layer selection {selection!r} selects none of the bank's layers ({', '.join(config_layers)}); "
                        "pick block indices among them, or 'all'")
    return tuple(chosen)
