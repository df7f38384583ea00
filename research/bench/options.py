"""Command-line list options shared by the bench CLIs: ``--x 1 2``, ``--x 1,2`` and mixes."""
import argparse


class Listed(list):
    """A list default shown in --help as ``a b c``."""

    def __str__(self):
        return " ".join(map(str, self)) or "none"


class ListAction(argparse.Action):
    """A list option that takes space-separated values, comma lists, or both (``1 2``, ``1,2``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v for value in values for v in value.split(",") if v]
        try:
            items = [self.type_of_items(v) for v in items]
        except ValueError:
            parser.error(f"argument {option_string}: expected {self.type_of_items.__name__} values, got {values}")
        bad = [v for v in items if self.allowed and v not in self.allowed]
        if bad or not items:
            parser.error(f"argument {option_string}: got {values}; choose from {', '.join(map(str, self.allowed))}"
                         if bad else f"argument {option_string}: no value given")
        setattr(namespace, self.dest, items)


def list_option(p, name, default, item_type=str, allowed=(), help=""):
    action = type(f"{item_type.__name__}_list", (ListAction,), dict(type_of_items=item_type, allowed=tuple(allowed)))
    p.add_argument(name, nargs="+", action=action, default=Listed(default),
                   metavar=("{" + ",".join(allowed) + "}") if allowed else item_type.__name__.upper(),
                   help=help + (" " if help else "") + "(space or comma separated)")
