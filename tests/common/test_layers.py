"""The shape of demo/common, checked: rules free of Tornado, each feature's SQL in its queries module,
views and the web base never reaching the database themselves, no SQLAlchemy internals anywhere.

These read the source (imports, outside ``if TYPE_CHECKING:`` blocks, which only annotate), so a change
that breaks the layering fails here with the module and the import to move.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "demo"
COMMON = DEMO / "common"
FEATURES = ("accounts", "h5", "images", "sms")
DATABASE = ("sqlalchemy", "demo.models", "demo.common.infra.db")
# What a home of hand-written SQL (a queries module, infra/ratelimit.py) takes from infra/db.py.
DB_SQL = tuple(f"demo.common.infra.db.{n}" for n in ("Sql", "SqlCursor", "Row", "sql_unit"))
# Names a SQLAlchemy upgrade may change without notice (compiler and exception internals).
INTERNALS = re.compile(r"\b(positiontup|effective_value|bind_processor|result_processor|DBAPIError\.instance)\b")


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "migrations" not in p.parts)


def package_of(path: Path) -> str:
    """The package a relative import in ``path`` starts from: ``demo/common/a/b.py`` -> ``demo.common.a``
    (a package's ``__init__.py`` -> that package)."""
    return ".".join(path.resolve().relative_to(DEMO.parent).parent.parts)


def absolute(package: str, module: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``package``."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    if level > len(parts):
        raise ValueError(f"relative import beyond the top-level package of {package}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports at run time (``from x import y`` counts as x and x.y; relative
    imports are resolved to absolute names, from ``package``: by default the one ``path`` is in)."""
    tree = ast.parse(path.read_text(), str(path))
    annotation_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in annotation_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute(package or package_of(path), node.module, node.level) if node.level else node.module
            if module is None:
                continue
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def reaching_any(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def reaching(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imports(path) if reaching_any(m, prefixes))


def name(path: Path) -> str:
    return str(path.relative_to(DEMO.parent))


def test_the_checks_see_the_tree():
    """A moved folder would make every check below pass on nothing."""
    assert {p.name for p in COMMON.iterdir() if p.is_dir()} >= {*FEATURES, "web", "infra"}
    for feature in FEATURES:
        assert (COMMON / feature / "rules.py").is_file() or feature == "sms", feature
    assert len(modules(COMMON)) > 30
    assert "tornado.web" in imports(COMMON / "web" / "base.py")


@pytest.mark.parametrize("path", modules(COMMON), ids=name)
def test_only_the_web_base_knows_tornados_request_handling(path):
    """Rules, queries and infrastructure are plain Python: the web base alone handles requests.
    (The SMS HTTP backend and the providers' poster use Tornado's HTTP client, which is a client, not
    request handling.)"""
    if "web" in path.relative_to(COMMON).parts:
        return
    sms_clients = (COMMON / "sms" / "backends.py", COMMON / "sms" / "providers" / "__init__.py")
    allowed = ("tornado.httpclient",) if path in sms_clients else ()
    reached = [m for m in reaching(path, ("tornado",)) if not reaching_any(m, allowed)]
    assert not reached, f"{name(path)} imports {reached}: request handling belongs in demo/common/web/"


@pytest.mark.parametrize("path", [p for f in FEATURES for p in modules(COMMON / f) if p.name != "queries.py"], ids=name)
def test_a_feature_reaches_the_database_only_through_its_queries_module(path):
    """Rules call named units of work of their queries module (``db.run(queries.x, ...)``); SQL, the
    tables and sessions live there only. ``Database``, ``Conflict`` and the rows a unit returns (``Row``)
    are the rules' whole view of it."""
    allowed = {f"demo.common.infra.db{n}" for n in ("", ".Database", ".Conflict", ".Row")}
    reached = set(reaching(path, DATABASE)) - allowed
    assert not reached, f"{name(path)} reaches {sorted(reached)}: move that into its queries.py"


def test_housekeeping_calls_queries_only():
    """Housekeeping composes one unit of work from the features' query functions: no SQL, tables or
    sessions of its own."""
    marks = (".sql_unit", ".idempotent", ".long_work")  # how its unit runs, declared beside it
    allowed = {f"demo.common.infra.db{n}" for n in ("", ".Database", ".Row", ".SqlCursor", *marks)}
    reached = set(reaching(COMMON / "housekeeping.py", DATABASE)) - allowed
    assert not reached, f"housekeeping.py reaches {sorted(reached)}: move that into a queries.py"


@pytest.mark.parametrize("path", modules(COMMON), ids=name)
def test_sql_is_written_only_in_queries_modules_and_the_rate_limit_counters(path):
    """``Sql`` statements are declared in a feature's queries.py, or in infra/ratelimit.py (the infra
    home of the counters' SQL), and nowhere else; neither reaches the ORM's sessions."""
    homes = path.name == "queries.py" or path == COMMON / "infra" / "ratelimit.py"
    if path == COMMON / "infra" / "db.py":
        return
    declares = "demo.common.infra.db.Sql" in imports(path)
    assert homes or not declares, f"{name(path)} declares SQL: move it into its feature's queries.py"
    if path == COMMON / "infra" / "ratelimit.py":
        reached = [m for m in reaching(path, DATABASE) if m not in ("demo.common.infra.db", *DB_SQL)]
        assert not reached, f"{name(path)} reaches {reached}: the counters run on a SqlCursor only"


@pytest.mark.parametrize("path", [*modules(DEMO / "views"), *modules(COMMON / "web")], ids=name)
def test_handlers_never_reach_the_database_nor_a_queries_module(path):
    reached = reaching(path, DATABASE) + [m for m in imports(path) if m.endswith(".queries")]
    assert not reached, f"{name(path)} reaches {reached}: call the feature's rules instead"


@pytest.mark.parametrize("path", sorted((DEMO / "views").glob("*_views.py")), ids=name)
def test_a_views_module_never_imports_another(path):
    """What two areas' handlers share (the upload stream, say) lives in demo/common/web/, held by both."""
    reached = reaching(path, ("demo.views",))
    assert not reached, f"{name(path)} imports {reached}: move what they share into demo/common/web/"


@pytest.mark.parametrize("path", modules(DEMO), ids=name)
def test_no_sqlalchemy_internals(path):
    """The fast path runs hand-written SQL on PEP 249 cursors (infra/db.py), so a SQLAlchemy upgrade
    cannot break it silently."""
    assert not INTERNALS.findall(path.read_text()), name(path)


def test_the_import_reader_sees_through_type_checking_blocks(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nimport tornado.web\nif TYPE_CHECKING:\n    from demo.models import User\n"
    )
    assert imports(source) == {"typing", "typing.TYPE_CHECKING", "tornado.web"}


def test_the_import_reader_resolves_relative_imports(tmp_path):
    assert package_of(COMMON / "accounts" / "rules.py") == "demo.common.accounts"
    assert package_of(COMMON / "accounts" / "__init__.py") == "demo.common.accounts"
    assert absolute("demo.common.accounts", "queries", 1) == "demo.common.accounts.queries"
    assert absolute("demo.common.accounts", None, 1) == "demo.common.accounts"
    assert absolute("demo.common.accounts", "infra.db", 2) == "demo.common.infra.db"
    assert absolute("demo.common.accounts", None, 3) == "demo"
    with pytest.raises(ValueError):
        absolute("demo.common.accounts", "x", 4)
    source = tmp_path / "m.py"
    source.write_text("from ..infra.db import Sql\nfrom . import queries\n")
    assert imports(source, "demo.common.accounts") == {
        "demo.common.infra.db",
        "demo.common.infra.db.Sql",
        "demo.common.accounts",
        "demo.common.accounts.queries",
    }
    # and so a relative import cannot slip past a check
    assert reaching_any("demo.common.infra.db.Sql", DATABASE)
