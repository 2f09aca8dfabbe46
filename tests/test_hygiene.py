"""The tests themselves follow two rules (docs: STYLE.md, "Names say what a thing does").

1. No wall-clock asserts: an ``assert`` that compares a clock reading, or a duration derived
   from one, with a number (``assert time.monotonic() - t0 < 30``) fails on a slow or busy
   machine and says nothing about what the code did; a lower bound (``>= 1``: it waited)
   says little more. Assert what was done instead: requests and retries counted by
   ``ckptstore.testing.counting``, backoffs or sleeps recorded, the error type.
2. Tests are named after the behaviour they check, not after the ticket that asked for
   them: no ticket numbers or code-audit references in file names, test names, section
   comments or docstrings.

Each finding is reported as ``path:line: what``.
"""

from __future__ import annotations

import ast
import io
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import textwrap
import tokenize

import pytest

from tests.conftest import SESSION_TMP_PREFIX, _remove_folders_of_dead_sessions

TESTS = pathlib.Path(__file__).resolve().parent

# -- rule 1: wall-clock asserts -----------------------------------------------------------------
CLOCK_FUNCTIONS = frozenset(
    {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "time", "time_ns"}
)
DURATION_NAME = re.compile(r"(^|_)(elapsed|duration|took|seconds|secs|wall)($|_)", re.I)


def _identifier(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value)
    return None


def _is_clock_call(node: ast.AST) -> bool:
    """``time.monotonic()``, ``perf_counter()``, ``time.time()``… (not any ``x.time()``:
    a bare ``time()`` or an attribute of a module named ``time``)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Attribute) and f.attr in CLOCK_FUNCTIONS:
        return isinstance(f.value, ast.Name) and f.value.id == "time"
    return isinstance(f, ast.Name) and f.id in CLOCK_FUNCTIONS - {"time_ns"}


def _clock_derived(node: ast.AST, names: set[str]) -> bool:
    """Whether ``node`` reads a clock, a name assigned from one, or a duration by name
    (an item of a mapping by its key alone: ``figures["saves"]`` is no duration because
    ``figures`` also holds one)."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return bool(DURATION_NAME.search(str(node.slice.value)))
    for sub in ast.walk(node):
        if _is_clock_call(sub):
            return True
        if isinstance(sub, ast.Name) and sub.id in names:
            return True
        ident = _identifier(sub)
        if ident is not None and DURATION_NAME.search(ident):
            return True
    return False


def _clock_names(tree: ast.AST) -> set[str]:
    """Names assigned (anywhere in the module) from a clock or from such a name."""
    assigns: list[tuple[list[str], ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            assigns.append((targets, node.value))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
            if isinstance(node.target, ast.Name) and node.value is not None:
                assigns.append(([node.target.id], node.value))
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for targets, value in assigns:
            if set(targets) - names and _clock_derived(value, names):
                names.update(targets)
                changed = True
    return names


def _is_number(node: ast.AST) -> bool:
    """A numeric literal, or arithmetic of numeric literals (``2 * 60``, ``-1``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _is_number(node.operand)
    if isinstance(node, ast.BinOp):
        return _is_number(node.left) and _is_number(node.right)
    return False


def _clock_bounds(expr: ast.AST, names: set[str]) -> bool:
    """Whether ``expr`` compares a clock reading or duration with a number, either way
    (``clock < N``, ``N >= clock``, ``clock >= N`` …)."""
    for node in ast.walk(expr):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for a, op, b in zip(operands[:-1], node.ops, operands[1:], strict=True):
            if not isinstance(op, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
                continue
            if _clock_derived(a, names) and _is_number(b):
                return True
            if _is_number(a) and _clock_derived(b, names):
                return True
    return False


UNITTEST_COMPARE = {"assertLess", "assertLessEqual", "assertGreater", "assertGreaterEqual"}


def wall_clock_asserts(source: str, filename: str = "<test>") -> list[str]:
    """``filename:line: ...`` for each assert that bounds elapsed wall-clock time above."""
    tree = ast.parse(source, filename)
    names = _clock_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and _clock_bounds(node.test, names):
            found.append(node)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in UNITTEST_COMPARE
            and len(node.args) >= 2
            and _clock_derived(node.args[0], names)
            and _is_number(node.args[1])
        ):
            found.append(node)
    return [
        f"{filename}:{n.lineno}: wall-clock bound `{ast.get_source_segment(source, n)}`"
        for n in sorted(found, key=lambda n: n.lineno)
    ]


# -- rule 2: named after the behaviour, not the ticket ---------------------------------------
TICKET_IN_NAME = re.compile(r"(^|_)(issue|review)(_?\d+)?($|_)|(^|_)(pr|gh|bug)_?\d+($|_)", re.I)
TICKET_IN_TEXT = re.compile(
    r"\bissues?\s*(no\.?\s*)?#?\s*\d+|\breview(s|ed|er|ers)?\b|\bPR\s*#?\s*\d+", re.I
)


def _docstrings(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                out.append((body[0].lineno, body[0].value.value))
    return out


def ticket_names(source: str, filename: str = "<test>") -> list[str]:
    """``filename:line: ...`` for each ticket reference in a test's file name, test
    names, comments or docstrings."""
    found = []
    if TICKET_IN_NAME.search(pathlib.Path(filename).stem):
        found.append(f"{filename}:1: file named after a ticket, not a behaviour")
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if TICKET_IN_NAME.search(node.name):
                found.append(f"{filename}:{node.lineno}: `{node.name}` named after a ticket")
    texts = _docstrings(tree)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            texts.append((tok.start[0], tok.string))
    for lineno, text in texts:
        for i, line in enumerate(text.splitlines()):
            m = TICKET_IN_TEXT.search(line)
            if m:
                found.append(f"{filename}:{lineno + i}: says {m.group(0)!r}: {line.strip()}")
    return sorted(found, key=lambda s: int(s.split(":")[1]))


def _test_sources() -> list[pathlib.Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _scan(check) -> list[str]:
    root = TESTS.parent
    out = []
    for path in _test_sources():
        out += check(path.read_text(encoding="utf-8"), str(path.relative_to(root)))
    return out


def test_no_wall_clock_asserts_in_tests():
    found = _scan(wall_clock_asserts)
    assert not found, "assert what was done, not how long it took:\n" + "\n".join(found)


def test_tests_are_named_after_behaviour():
    found = _scan(ticket_names)
    assert not found, "name tests after what they check:\n" + "\n".join(found)


# -- the checks catch what they are for, and only that --------------------------------------
CAUGHT = {
    "monotonic difference": """
        t0 = time.monotonic()
        with pytest.raises(CkptStoreError):
            save()
        assert time.monotonic() - t0 < 30
        """,
    "inside a conjunction": """
        t0 = time.perf_counter()
        run()
        assert ok and time.perf_counter() - t0 <= 2.5
        """,
    "duration variable": """
        start = time.time()
        run()
        dt = time.time() - start
        assert dt < 15
        """,
    "duration by name": "assert result.load_seconds < 60",
    "duration key": 'assert row["elapsed"] < 2 * 60',
    "number on the left": "assert 20 > elapsed",
    "chained": "assert 0 <= elapsed < 5",
    "imported clock": """
        from time import perf_counter
        t = perf_counter()
        run()
        took = perf_counter() - t
        assert took < 1
        """,
    "unittest style": "self.assertLess(time.monotonic() - t0, 5)",
    "lower bound": """
        t0 = time.monotonic()
        assert faulty.get("k") == b"1"
        assert time.monotonic() - t0 >= 0.25 and gate.reached.is_set()
        """,
}

LEFT_ALONE = {
    "timestamps compared": "assert time.time() < report.held_until <= time.time() + 31",
    "poll deadline": """
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline
        """,
    "recorded backoffs": "assert backoffs.slept and max(backoffs.slept) <= 0.1",
    "counts": 'assert counted.requests["put", "chunks"] < 32',
    "equality": "assert parse_duration(text) == seconds",
    "other time attribute": "assert clock.time() < 5",
}


@pytest.mark.parametrize("source", CAUGHT.values(), ids=CAUGHT.keys())
def test_wall_clock_check_catches(source):
    assert wall_clock_asserts(textwrap.dedent(source))


@pytest.mark.parametrize("source", LEFT_ALONE.values(), ids=LEFT_ALONE.keys())
def test_wall_clock_check_leaves_alone(source):
    assert wall_clock_asserts(textwrap.dedent(source)) == []


def test_ticket_check_catches_names_comments_and_docstrings():
    issue, review = "issue", "Review"  # split, so this file does not trip its own check
    source = textwrap.dedent(f'''
        """Drop-in for DCP users ({issue} 13 §1)."""
        # -- bounded decoding ({issue} #10) --------------------
        def test_{issue}_11_race():
            """Interleavings a {review.lower()} found."""
        # -- {review} findings --
        ''')
    found = ticket_names(source, f"tests/test_{review.lower()}_races.py")
    assert [f.split(":")[1] for f in found] == ["1", "2", "3", "4", "5", "6"], found


def test_ticket_check_leaves_behaviour_names_alone():
    source = textwrap.dedent('''
        """Races between gc, overwrite and DCP plan caching; it issues one warning."""
        # -- malformed manifests are refused with the field named --
        def test_issued_lease_expires():
            """Previews the plan before running it."""
        ''')
    assert ticket_names(source, "tests/test_gc_races.py") == []


# -- the session's temp folder ---------------------------------------------------------------
def test_scratch_space_is_the_sessions_own_folder(tmp_path):
    """tempfile and $TMPDIR, here and in child processes, point at the folder conftest
    removes at the end of the session; pytest's tmp_path lives outside it, where a failed
    test's folder is kept."""
    session = pathlib.Path(tempfile.gettempdir())
    assert session.name.startswith(SESSION_TMP_PREFIX) and session.is_dir()
    assert os.environ["TMPDIR"] == str(session)
    child = subprocess.run(
        [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == str(session)
    assert session not in tmp_path.parents


def test_folders_of_killed_sessions_are_removed_by_the_next():
    system = pathlib.Path(tempfile.gettempdir()).parent
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = pathlib.Path(
        tempfile.mkdtemp(prefix=f"{SESSION_TMP_PREFIX}{ended.stdout.strip()}-", dir=system)
    )
    (dead / "left.bin").write_bytes(b"x")
    _remove_folders_of_dead_sessions(str(system))
    assert not dead.exists()
    assert pathlib.Path(tempfile.gettempdir()).is_dir()  # this live session's stays
