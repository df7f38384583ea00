"""Command-line helpers shared by the pack's CLIs and widgets: list options (``--seeds 0 1 2``,
``--seeds 0,1,2`` or both: ``--seeds 0 1,2``), image sizes and prompt files."""
import argparse
from pathlib import Path
from typing import List, Tuple, Type


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the description as written and each option's default (unless it is None or
    the help already says it)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def list_items(text) -> List[str]:
    """'0,1 2' or ['0', '1,2'] -> ['0', '1', '2']: comma and space separated lists alike
    (a widget's text or a flag's words)."""
    parts = text if isinstance(text, (list, tuple)) else [text]
    return [p for part in parts for p in str(part).replace(",", " ").split()]


def size_of(text: str) -> Tuple[int, int]:
    """'512' -> (512, 512), '768x512' -> (768, 512): (width, height) in pixels; ValueError if not a size."""
    w, _, h = text.strip().lower().partition("x")
    return int(w), int(h or w)


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


def read_prompt_file(path: str, error: Type[Exception] = ValueError) -> List[str]:
    """The non-empty lines of a UTF-8 prompt file (``--prompts``), stripped; ``error`` (the
    CLI's own error type) names the file when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"--prompts {path}: no such file; give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"--prompts {path}: cannot read it as UTF-8 text ({e})") from None
    return prompt_lines(text)


def prompt_lines(text: str) -> List[str]:
    """One prompt per non-empty line, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def flat(values):
    """The items of a list option given as ``nargs="+"`` words of ``comma_list``."""
    return None if values is None else [v for group in values for v in group]
