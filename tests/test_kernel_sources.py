"""Static checks on the Triton kernels that the CPU interpreter cannot make.

- The interpreter lets a @triton.jit function read plain Python globals (an int op code, a float
  constant); Triton's GPU compiler refuses them ("Cannot access global variable ... from within
  @jit'ed function") unless they are tl.constexpr.
- The compiler treats a name assigned before a loop and again inside it as loop-carried and
  demands one type; the interpreter does not. ``_`` (a discarded int before the loop, a discarded
  mask inside) bit the project this way.
- A str default of a jit helper's parameter (``EVICTION: tl.constexpr = ""``) reaches Triton
  3.6's compiler as a runtime value when a caller leaves it out ("'str' object has no attribute
  'type'"); the interpreter, and Triton 3.9's compiler, accept it. A ``tl.constexpr(...)`` default
  works everywhere.
Each passed CI on CPU and failed on the GPU once; CI runs on CPU, so check the sources here.
"""

import ast
import importlib
import inspect
import pkgutil
import textwrap

import pytest
import triton

import jagged.ops


def jitted_functions():
    for info in pkgutil.iter_modules(jagged.ops.__path__):
        module = importlib.import_module(f"jagged.ops.{info.name}")
        for name, obj in vars(module).items():
            obj = getattr(obj, "kernel", obj) if type(obj).__name__ == "FastLaunch" else obj  # ops/_launch.py
            fn = getattr(obj, "fn", None)  # JITFunction and the interpreter's wrapper both keep .fn
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__ and \
                    type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                yield pytest.param(module, fn, id=f"{info.name}.{name}")


@pytest.mark.parametrize("module, fn", list(jitted_functions()))
def test_kernels_read_no_plain_python_globals(module, fn):
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    local_names = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    local_names |= {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.For, ast.AugAssign))
                    for t in ast.walk(n.targets[0] if isinstance(n, ast.Assign) else n.target)
                    if isinstance(t, ast.Name)}
    bad = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                  and n.id not in local_names and n.id in vars(module)
                  and isinstance(vars(module)[n.id], (bool, int, float, str))
                  and not isinstance(vars(module)[n.id], triton.language.constexpr)})
    assert not bad, f"{fn.__name__} reads plain Python globals {bad}: use tl.constexpr or a kernel argument"


def _assigned_names(stmts):
    return {t.id for n in stmts for a in ast.walk(n) if isinstance(a, ast.Assign)
            for target in a.targets for t in ast.walk(target) if isinstance(t, ast.Name)}


def loop_carried_discards(stmts, defined):
    """Lines of loops and ifs that assign ``_`` while an enclosing scope already did (a runtime
    ``if`` merges its branches' names with the earlier ones, as a loop carries them). Names
    assigned in a loop body stay inside it (Triton does not carry them out); ``if`` bodies leak
    outwards."""
    found = []
    for stmt in stmts:
        if isinstance(stmt, (ast.For, ast.While)):
            if "_" in _assigned_names(stmt.body) and "_" in defined:
                found.append(stmt.lineno)
            found += loop_carried_discards(stmt.body, set(defined))
        elif isinstance(stmt, ast.If):
            if "_" in _assigned_names(stmt.body + stmt.orelse) and "_" in defined:
                found.append(stmt.lineno)
            found += loop_carried_discards(stmt.body, defined)
            found += loop_carried_discards(stmt.orelse, defined)
        elif isinstance(stmt, ast.Assign):
            defined |= {t.id for target in stmt.targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    return found


@pytest.mark.parametrize("module, fn", list(jitted_functions()))
def test_discarded_names_are_not_loop_carried(module, fn):
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    lines = loop_carried_discards(tree.body[0].body, set())
    assert not lines, f"{fn.__name__}: '_' is assigned before the loop / if at line(s) {lines} and inside it"


def test_the_check_finds_kernels():
    assert len(list(jitted_functions())) >= 10


@pytest.mark.parametrize("module, fn", list(jitted_functions()))
def test_parameter_defaults_are_not_plain_strings(module, fn):
    bad = [name for name, p in inspect.signature(fn).parameters.items() if isinstance(p.default, str)]
    assert not bad, f"{fn.__name__}: parameter(s) {bad} default to a str; use tl.constexpr(\"...\")"
