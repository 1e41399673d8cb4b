"""Small files with one concept each: no module under pdcli/ over 400 lines, no function over 60."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "pdcli"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, body lines) per function: the body without its docstring, less the lines of the
    functions nested in it (each counts on its own)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            body = body[1:]
        if not body:
            continue
        nested = set()
        for inner in ast.walk(node):
            if inner is not node and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([inner.lineno] + [d.lineno for d in inner.decorator_list])
                nested.update(range(first, inner.end_lineno + 1))
        lines = [n for n in range(body[0].lineno, body[-1].end_lineno + 1) if n not in nested]
        out.append((node.name, node.lineno, len(lines)))
    return out


def test_the_counter_counts_bodies_and_nested_functions_apart():
    src = "def f():\n    '''doc'''\n    x = 1\n    def g():\n        return 2\n    return x\n"
    assert sorted(function_lengths(src)) == [("f", 1, 2), ("g", 4, 1)]


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_module_and_function_sizes(path):
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_FILE_LINES, f"{path.name} has {len(source.splitlines())} lines"
    long = [f"{name} (line {line}): {n} lines" for name, line, n in function_lengths(source) if n > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: " + "; ".join(long)
