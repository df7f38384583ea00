"""The bench CLIs' list options: ``edit_core.util.cli.comma_list`` values (``--x 1 2``,
``--x 1,2`` and mixes), checked against the allowed ones, the default shown as ``a b c``."""
import argparse
import functools

from edit_core.util.cli import comma_list


class Listed(list):
    """A list default shown in --help as ``a b c``."""

    def __str__(self):
        return " ".join(map(str, self)) or "none"


class Allowed(argparse.Action):
    """The flattened items of one occurrence (a later one replaces it), each among ``allowed`` if given."""

    def __init__(self, *args, allowed=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v for group in values for v in group]
        bad = [v for v in items if self.allowed and v not in self.allowed]
        if bad:
            parser.error(f"argument {option_string}: got {bad}; choose from {', '.join(map(str, self.allowed))}")
        setattr(namespace, self.dest, items)


def list_option(p, name, default, item_type=str, allowed=(), help=""):
    p.add_argument(name, nargs="+", type=comma_list(item_type), default=Listed(default),
                   action=functools.partial(Allowed, allowed=tuple(allowed)),
                   metavar=("{" + ",".join(allowed) + "}") if allowed else item_type.__name__.upper(),
                   help=help + (" " if help else "") + "(space or comma separated)")
