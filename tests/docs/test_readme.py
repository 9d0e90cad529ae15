"""README.md as a test: every ```python block runs, and every ``python -m`` command it names exists.

Each ```python block runs in a fresh namespace (``torch.manual_seed(0)`` first), one top-level
statement at a time, so that the comments that state a result are checked where that is robust:

- ``# SomeError: message ...`` on a statement: that statement alone must raise ``SomeError`` and
  its message must start with the text before the first ``[...]`` / ``...`` placeholder;
- a comment that is a Python literal (whole, or up to two spaces or a ``;``): an expression's
  value must equal it (a tuple against a tensor's shape, a set against a dict's keys, a list
  of names with the ``test_*`` entries other tests register left out), and so must the name an
  assignment binds; ``# bool (8, 64, 32, 3, 3)`` checks a tensor's dtype and shape;
- ``print(...)  # 6 9902: ...``: the printed line must equal the comment up to its first ``:``;
- a comment line that is a comparison (``# info == {...}``) is evaluated and must hold;
- a comment-only line right below a statement describes that statement, like a trailing one.

Any other comment is prose and is not checked. ``PRELUDE`` lists the imports a block relies on
without writing them (keep it empty: a README block should run as pasted).

The ``python -m MODULE`` commands of this repository's packages (in ```bash blocks and inline
code) must name a module with a
``main`` whose ``--help`` exits 0 (run in-process), and every ``--flag`` they show must appear in
that help.
"""

import ast
import builtins
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = README.read_text(encoding="utf-8")
LINES = TEXT.splitlines()

# Imports a block uses but does not write, keyed by the start of the block's first line. Each
# entry is a README bug to fix (the block fails when pasted alone); remove it once fixed.
PRELUDE: dict[str, str] = {}


def _python_blocks():
    """``(first line number, source)`` of every ```python block."""
    blocks, start, body = [], None, []
    for number, line in enumerate(LINES, 1):
        if start is None and line.strip().startswith("```python"):
            start, body = number + 1, []
        elif start is not None and line.strip().startswith("```"):
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


BLOCKS = _python_blocks()


def _comment(line: str) -> str | None:
    """The ``#`` comment of a source line (outside strings), without the ``#``."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip()
    return None


def _statement_comment(lines, node, next_lineno):
    """The comment on ``node``'s last line, else the comment-only lines right below it."""
    trailing = _comment(lines[node.end_lineno - 1])
    if trailing:
        return trailing
    below = []
    for ln in range(node.end_lineno + 1, next_lineno):
        text = lines[ln - 1].strip()
        if not text.startswith("#"):
            break
        below.append(text[1:].strip())
    return " ".join(below) or None


def _literal(comment: str):
    """The Python literal a comment states (whole, or before two spaces / ';'), or raise."""
    for candidate in (comment, comment.split("  ")[0], comment.split(";")[0]):
        try:
            return ast.literal_eval(candidate.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    raise ValueError("not a literal")


def _check_value(value, expected, where):
    if isinstance(expected, set) and isinstance(value, dict):
        assert set(value) == expected, f"{where}: keys {sorted(value)} != {sorted(expected)}"
    elif isinstance(expected, tuple) and isinstance(value, torch.Tensor):
        assert tuple(value.shape) == expected, f"{where}: shape {tuple(value.shape)}"
    elif isinstance(expected, list) and isinstance(value, list):
        names = [v for v in value if not (isinstance(v, str) and v.startswith("test_"))]
        assert names == expected, f"{where}: {value!r} != {expected!r}"
    elif isinstance(expected, bool):
        got = value.item() if isinstance(value, torch.Tensor) else value
        assert got is expected or got == expected, f"{where}: {value!r} != {expected!r}"
    else:
        assert value == expected, f"{where}: {value!r} != {expected!r}"


_RAISES = re.compile(r"^([A-Za-z_]\w*(?:Error|Exception|Warning)):\s*(.*)$")
_DTYPE_SHAPE = re.compile(r"^(bool|u?int\d+|float\d+|bfloat16|complex\d+)\s+(\([\d,\s]*\))")


def _run_statement(node, src_lines, ns, comment, where):
    """Run one top-level statement and check what its comment claims."""
    source = "\n".join(src_lines[node.lineno - 1:node.end_lineno])
    raises = _RAISES.match(comment) if comment else None
    if raises:
        exc = getattr(builtins, raises.group(1), None)
        assert exc is not None, f"{where}: unknown exception {raises.group(1)}"
        prefix = re.split(r"\[\.\.\.\]|\.\.\.", raises.group(2))[0].strip()
        with pytest.raises(exc) as info:
            exec(compile(ast.Module([node], []), where, "exec"), ns)
        assert str(info.value).startswith(prefix), (
            f"{where}: {source.strip()!r} raised {str(info.value)!r}, README says {prefix!r}")
        return
    is_print = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "print")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), where, "eval"), ns)
        else:
            exec(compile(ast.Module([node], []), where, "exec"), ns)
            value = None
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                value = ns[node.targets[0].id]
    if not comment:
        return
    if is_print:
        expected = comment.split(":")[0].strip()
        assert out.getvalue().strip() == expected, f"{where}: printed {out.getvalue()!r}"
        return
    try:  # "# name == {...}" below a statement: a claim to evaluate
        claim = ast.parse(comment, mode="eval").body
    except SyntaxError:
        claim = None
    if isinstance(claim, ast.Compare) and isinstance(claim.left, ast.Name) \
            and claim.left.id in ns:
        assert eval(comment, ns), f"{where}: {comment} does not hold"
        return
    dtype_shape = _DTYPE_SHAPE.match(comment)
    if dtype_shape and isinstance(value, torch.Tensor):
        assert value.dtype == getattr(torch, dtype_shape.group(1)), f"{where}: {value.dtype}"
        _check_value(value, ast.literal_eval(dtype_shape.group(2)), where)
        return
    if value is None:
        return
    try:
        expected = _literal(comment)
    except ValueError:
        return  # prose
    _check_value(value, expected, where)


@pytest.mark.parametrize("start,source", BLOCKS, ids=[f"line{s}" for s, _ in BLOCKS])
def test_readme_python_block(start, source):
    first = source.splitlines()[0].strip()
    prelude = [code for key, code in PRELUDE.items() if first.startswith(key)]
    source = "".join(code + "\n" for code in prelude) + source
    offset = start - 1 - len(prelude)
    lines = source.splitlines()
    tree = ast.parse(source)
    torch.manual_seed(0)
    ns = {"__name__": "readme_block"}
    for i, node in enumerate(tree.body):
        following = tree.body[i + 1].lineno if i + 1 < len(tree.body) else len(lines) + 1
        comment = _statement_comment(lines, node, following)
        where = f"README.md:{node.lineno + offset}"
        _run_statement(node, lines, ns, comment, where)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


# --- python -m commands -------------------------------------------------------------------

PACKAGES = ("wtmodels", "benchmarks")  # this repository's; venv, pip and pytest are not checked


def _commands():
    """``(module, [flags], README line)`` for every ``python -m`` / ``torchrun -m`` command."""
    spans = []  # (line number, text) of bash lines and inline code spans
    in_bash = False
    for number, line in enumerate(LINES, 1):
        if line.strip().startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh")
            continue
        if in_bash:
            spans.append((number, line))
    joined = []  # bash lines with "\" continuations joined, comments dropped
    for number, line in spans:
        line = line.split("  #")[0]
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
        else:
            joined.append((number, line.rstrip()))
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", TEXT):
        joined.append((TEXT.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())))
    found = []
    for number, text in joined:
        for part in re.split(r"&&|;|\|", text):
            cmd = re.search(r"(?:python3? |torchrun .*?)-m ([A-Za-z_][\w.]*)(.*)", part)
            if cmd and cmd.group(1).split(".")[0] in PACKAGES:
                flags = re.findall(r"(?<![\w-])--[a-z][\w-]*", cmd.group(2))
                found.append((cmd.group(1), flags, number))
    return found


COMMANDS = _commands()
MODULES = sorted({module for module, _, _ in COMMANDS})


def _help(module: str) -> str:
    mod = importlib.import_module(module)
    assert callable(getattr(mod, "main", None)), f"{module} has no main()"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        mod.main(["--help"])
    assert info.value.code in (0, None), f"{module} --help exited {info.value.code}"
    return out.getvalue()


_HELP: dict[str, str] = {}


@pytest.mark.parametrize("module", MODULES)
def test_readme_module_help(module):
    _HELP[module] = _help(module)
    assert "--help" in _HELP[module]


@pytest.mark.parametrize("module,flags,line", COMMANDS,
                         ids=[f"line{n}-{m}" for m, _, n in COMMANDS])
def test_readme_command_flags_exist(module, flags, line):
    text = _HELP.get(module) or _help(module)
    _HELP[module] = text
    missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)]
    assert not missing, f"README.md:{line}: python -m {module} has no {missing}"


def test_readme_names_the_main_commands():
    assert {"wtmodels.train", "benchmarks.run", "benchmarks.plot",
            "benchmarks.recommend"} <= set(MODULES)
