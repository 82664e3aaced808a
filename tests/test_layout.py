"""The layout's floors: launch -> trainer -> balancing / data / models, with no import upward
(a lower floor importing a higher one ties it to what it should not know)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABOVE = {"trainer": {"launch"}, "balancing": {"launch", "trainer"}, "data": {"launch", "trainer"},
         "models": {"launch", "trainer"}}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_no_floor_imports_a_floor_above_it():
    upward = [f"{p.relative_to(ROOT)} imports {m}" for floor, above in ABOVE.items()
              for p in (ROOT / floor).rglob("*.py") for m in _imports(p) if m.split(".")[0] in above]
    assert not upward, upward


def test_trainer_rooms_say_what_they_hold():
    for room in ("trainer", "trainer/serving", "trainer/tools"):
        doc = ast.get_docstring(ast.parse((ROOT / room / "__init__.py").read_text()))
        assert doc and "\n" not in doc.strip(), room
