"""Every command-line example in README.md and docs/*.md is checked, so none can rot.

Which lines count: in a code block (fenced, or indented 4 spaces) or an inline code span,
a command (after optional ``VAR=value`` words) that is ``bash scripts/edit.sh TOOL``,
``bash scripts/run_example.sh``, or runs ``-m edit_core.MODULE`` (with any Python, or
torchrun). Lines ending in ``\\`` are joined; ``# comments`` are dropped.

How: each example's arguments go through its tool's real argparse parser in one Python
process (parse only: all flags exist, values convert, required ones are given; nothing
runs). An example with no arguments, or with a ``...`` placeholder, is run as ``--help``.
Every tool the docs name through the wrapper is also run for real as
``bash scripts/edit.sh TOOL --help``. README commands use the wrapper or the host's Python,
never a bare ``python``, which on a fresh machine has no torch.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import COMFYUI_DIR, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENV_WORD = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def code_lines(text: str):
    """Lines of code blocks (fenced or indented) and inline code spans, continuations joined."""
    out, fenced, pending = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            out.append(line)
        else:
            out += re.findall(r"`([^`]+)`", line)
    return out


# scripts/edit.sh's tools: name -> module, from the one table the wrapper reads.
TOOLS = dict(line.split() for line in (REPO / "scripts" / "tools.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#"))


def module_and_args(line: str):
    """(module, args) of a CLI example, or None for any other line."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and ENV_WORD.match(words[0]):
        words = words[1:]
    if len(words) >= 2 and words[0] == "bash" and words[1].endswith("scripts/edit.sh"):
        if len(words) < 3:
            return None
        return TOOLS.get(words[2], f"no tool {words[2]!r}"), words[3:]
    if len(words) >= 2 and words[0] == "bash" and words[1].endswith("scripts/run_example.sh"):
        return "edit_core.client.example", words[2:]
    if "-m" in words and words.index("-m") + 1 < len(words) and \
            words[words.index("-m") + 1].startswith(("edit_core.", "research.")):
        k = words.index("-m")
        return words[k + 1], words[k + 2:]
    return None


def examples():
    found = []
    for doc in DOCS:
        for line in code_lines(doc.read_text()):
            parsed = module_and_args(line)
            if parsed:
                module, args = parsed
                if not args or "..." in args:
                    args = ["--help"]
                found.append((doc.relative_to(REPO).as_posix(), line, module, args))
    return found


EXAMPLES = examples()

# Runs each tool's main() with argparse stopped right after parsing; prints one JSON line per example.
PARSE_ONLY = r"""
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
real_parse_args = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    real_parse_args(self, args, namespace)
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_then_stop
for module, args in json.loads(sys.argv[1]):
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        outcome = "ran past parsing"
    except Parsed:
        outcome = "ok"
    except SystemExit as e:
        outcome = "ok" if e.code in (0, None) else f"exit {e.code}"
    except BaseException as e:
        outcome = f"{type(e).__name__}: {e}"
    print(json.dumps([module, args, outcome]), flush=True)
"""


def test_the_docs_have_cli_examples_and_the_rule_finds_them():
    docs = {doc for doc, *_ in EXAMPLES}
    assert "README.md" in docs and len(EXAMPLES) >= 8
    modules = {m for _, _, m, _ in EXAMPLES}
    assert {"edit_core.client.example", "edit_core.client.batch", "edit_core.distill", "research.bench"} <= modules


def test_every_cli_example_parses_with_its_tool():
    env = dict(os.environ, PYTHONPATH=str(REPO), EDIT_COMFYUI_DIR=str(COMFYUI_DIR))
    todo = [[m, a] for _, _, m, a in EXAMPLES]
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(todo)], capture_output=True, text=True,
                          env=env, cwd=str(REPO), timeout=600)
    outcomes = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(outcomes) == len(todo), proc.stderr[-3000:]
    bad = [f"{doc}: {line!r} -> {outcome}" for (doc, line, _, _), (_, _, outcome) in zip(EXAMPLES, outcomes)
           if outcome != "ok"]
    assert not bad, "\n".join(bad) + "\n" + proc.stderr[-3000:]


@pytest.mark.parametrize("tool", sorted({line.split("edit.sh", 1)[1].split()[0] for _, line, _, _ in EXAMPLES
                                         if "scripts/edit.sh" in line}))
def test_the_wrapper_runs_each_documented_tool(tool):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "edit.sh"), tool, "--help"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]


def test_the_wrapper_refuses_an_unknown_tool_in_one_line():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "edit.sh"), "nosuch"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no tool 'nosuch'" in proc.stderr and "batch" in proc.stderr


def test_readme_commands_never_use_a_bare_python():
    bare = [line for line in code_lines((REPO / "README.md").read_text())
            if re.match(r"^(\S+=\S+\s+)*python3?\s", line.strip())]
    assert not bare, f"use `bash scripts/edit.sh TOOL` or .host/venv/bin/python: {bare}"
