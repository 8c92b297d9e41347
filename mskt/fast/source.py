"""Point 2 of the verification (``mskt.fast.stacks``): is the model's Python code still the code the
compiled kernels and the stacks node were written from? A digest of its source, comments and
docstrings left out, against :data:`MIRRORED_SOURCE`."""

from __future__ import annotations

import hashlib
import inspect
import io
import textwrap
import tokenize

from mskt.model.layers import Attention, Kernels, Transformer, TransformerLayer

# The digest of the Python code the compiled node mirrors (see the module docstring, point 2).
MIRRORED_SOURCE = "8281d603aef3551123e3a84bf3ce792ae9bb72c6"


def mirrored_roots() -> tuple:
    """The roots of the mirrored code: (class, method name) for one method, or a class for all of
    its own. The digest follows the functions of mskt.model they name."""
    return ((Transformer, "forward"), (TransformerLayer, "forward"), (Attention, "forward"), Kernels)



def _normalised_source(obj) -> str:
    """``obj``'s source as tokens, without comments, blank lines or docstrings."""
    source = textwrap.dedent(inspect.getsource(obj))
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in (tokenize.COMMENT, tokenize.NL)]
    kept, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        # A docstring: a string statement right after a block opens (":" NEWLINE INDENT STRING NEWLINE).
        if (t.type == tokenize.STRING and i >= 3 and tokens[i - 1].type == tokenize.INDENT and tokens[i - 2].type == tokenize.NEWLINE
                and tokens[i - 3].string == ":" and i + 1 < len(tokens) and tokens[i + 1].type == tokenize.NEWLINE):
            i += 2
            continue
        kept.append(t.string if t.type != tokenize.INDENT else "<indent>")
        i += 1
    return " ".join(kept)


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names


def _model_globals(func) -> list:
    """(globals, name, object) for each function or class of mskt.model that ``func`` names."""
    found = []
    for name in sorted(_code_names(func.__code__)):
        obj = func.__globals__.get(name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "").startswith("mskt.model"):
            found.append((func.__globals__, name, obj))
    return found


def mirrored_code() -> tuple[str, list]:
    """The digest of the mirrored code, and the (namespace, name, object) bindings it read: each
    method from its class's namespace, each helper from its module's. A binding that changes later (a
    class-level or module-level patch) means the code changed."""
    seen, parts, bindings = set(), [], []
    todo = []
    for root in mirrored_roots():
        cls, names = (root, [n for n, v in vars(root).items() if inspect.isfunction(v)]) if inspect.isclass(root) else (root[0], [root[1]])
        todo += [(vars(cls), n, vars(cls)[n]) for n in names]
    while todo:
        namespace, name, obj = todo.pop(0)
        bindings.append((namespace, name, obj))
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        parts.append(f"{getattr(obj, '__qualname__', name)}: {_normalised_source(obj)}")
        members = [getattr(v, "__func__", v) for v in vars(obj).values()] if inspect.isclass(obj) else [obj]  # static methods too
        for f in members:
            if inspect.isfunction(f):
                todo += _model_globals(f)
    return hashlib.sha1("\n".join(parts).encode()).hexdigest(), bindings


_source_state = None  # (bindings, why) of the last mirrored_code() check


def source_verified() -> tuple[bool, str]:
    """Whether the mirrored code is the code the node was written from (point 2), and why not.
    Recomputed only when one of the bindings it read has changed."""
    global _source_state
    if _source_state is not None and all(ns.get(n) is o for ns, n, o in _source_state[0]):
        return not _source_state[1], _source_state[1]
    try:
        digest, bindings = mirrored_code()
    except (OSError, TypeError) as e:  # source not available (e.g. a function made by exec)
        bindings = [(vars(c), n, vars(c).get(n)) for c, n in mirrored_roots()[:3]]
        why = f"the source of the code it mirrors cannot be read ({e})"
    else:
        why = "" if digest == MIRRORED_SOURCE else f"the model's layer code differs from the code the compiled node mirrors (source digest {digest[:12]})"
    _source_state = (bindings, why)
    return not why, why
