"""No way to run code from a file or a string anywhere in the pack: every tracked
Python file is searched for Python's object deserialiser and for eval/exec. The patterns are
assembled here so that this file does not match itself."""
import re
import subprocess

from helpers import REPO

FORBIDDEN = {
    "torch.load(..., weights_only=" + "False) (loads arbitrary Python objects)": r"weights_only\s*=\s*False",
    "pick" + "le (runs code while loading)": r"(?i)pick" + r"le",
    "ev" + "al( (runs a string as code)": r"(?<![\w.])ev" + r"al\(",
    "ex" + "ec( (runs a string as code)": r"(?<![\w.])ex" + r"ec\(",
}


def pack_python_files():
    """Tracked .py files (a clean clone's), without the test host."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / name for name in listed.stdout.splitlines() if not name.startswith(".host/")]


def test_the_search_sees_the_pack():
    names = {p.relative_to(REPO).as_posix() for p in pack_python_files()}
    assert {"edit_core/bank/file.py", "edit_core/client/batch.py", "nodes/bank_nodes.py", "tests/project/test_no_unsafe_code.py"} <= names


def test_no_unpickling_and_no_eval_or_exec_in_the_pack():
    hits = []
    for path in pack_python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            hits += [f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}"
                     for what, pattern in FORBIDDEN.items() if re.search(pattern, line)]
    assert not hits, "code that can run what a file or string contains:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_are_for():
    lines = {"torch.load(p, weights_only=" + "False)": 0, "import pick" + "le": 1, "x = ev" + "al(text)": 2,
             "ex" + "ec(code)": 3}
    for line, index in lines.items():
        assert re.search(list(FORBIDDEN.values())[index], line), line
    for harmless in ("model.eval()", "module.exec_module(m)", "torch.load(p, weights_only=True)", "retrieval(x)"):
        assert not any(re.search(p, harmless) for p in FORBIDDEN.values()), harmless
