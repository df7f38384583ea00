"""Command-line list options shared by the pack's CLIs: ``--seeds 0 1 2``, ``--seeds 0,1,2``
or both (``--seeds 0 1,2``)."""
import argparse


def comma_list(item_type):
    """argparse type of one value of a list option: an item or a comma list of them."""
    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r}: an empty item in the list")
        return [item_type(part) for part in parts]
    return parse


class Concatenate(argparse.Action):
    """A list option takes space-separated values, comma lists or both (``--seeds 0 1,2``)
    and may be repeated."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(getattr(namespace, self.dest) or []) + [v for vs in values for v in vs])


def flat(values):
    """The items of a list option given as ``nargs="+"`` words of ``comma_list``."""
    return None if values is None else [v for group in values for v in group]
