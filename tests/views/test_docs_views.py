"""The contract in the repository (docs/API.md) agrees with openapi.yaml and the error table, and
the readable reference at /docs is served from this server alone."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.common.web.errors import ERROR_STATUS

ROOT = Path(__file__).resolve().parents[2]
API_MD = ROOT / "docs" / "API.md"
HTTP_METHODS = ("get", "put", "post", "delete", "head", "patch")
gen_test = pytest.mark.gen_test(timeout=30)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(resources.files("demo").joinpath("static/openapi.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def api_md() -> str:
    return API_MD.read_text(encoding="utf-8")


def error_table(markdown: str) -> dict[str, int]:
    """code -> status from the rows of a Markdown error table: | `code` | status | when |."""
    return {code: int(status) for code, status in re.findall(r"^\s*\| `(\w+)` \| (\d{3}) \|", markdown, re.M)}


def test_every_operation_of_openapi_is_in_api_md(spec, api_md):
    operations = [
        f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS
    ]
    missing = [op for op in operations if not re.search(rf"`{re.escape(op)}[`?\s]", api_md)]
    assert not missing, f"operations of openapi.yaml missing from docs/API.md: {missing}"


def test_every_error_code_is_in_api_md_and_openapi_with_its_status(spec, api_md):
    in_api_md = error_table(api_md)
    in_openapi = error_table(spec["info"]["description"])
    enum = set(spec["components"]["schemas"]["ErrorCode"]["enum"])
    for code, status in ERROR_STATUS.items():
        assert in_api_md.get(code) == status, f"docs/API.md: {code} should be listed as {status}"
        assert in_openapi.get(code) == status, f"openapi.yaml's error table: {code} should be {status}"
        assert code in enum, f"openapi.yaml's ErrorCode lacks {code}"
    assert in_api_md == in_openapi, "docs/API.md and openapi.yaml list different error codes"


def test_readme_links_resolve_inside_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert "docs/API.md" in local
    broken = [link for link in local if not (ROOT / link).resolve().is_relative_to(ROOT) or not (ROOT / link).exists()]
    assert not broken, f"README links to files that are not in the repository: {broken}"


class Assets(HTMLParser):
    """The page's scripts and style sheets, and any other URL it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str | None] = []
        self.styles: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self.scripts.append(values.get("src"))  # None: an inline script, which the CSP would refuse
        elif tag == "link" and values.get("rel") == "stylesheet":
            self.styles.append(values["href"] or "")
        self._in_title = tag == "title"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False


@gen_test
async def test_docs_page_loads_every_script_and_style_from_this_server(api):
    page = await api.get("/docs")
    assert page.code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "default-src 'self';" in csp
    html = page.body.decode()
    assert 'data-url="/openapi.yaml"' in html
    assets = Assets()
    assets.feed(html)
    assert "API reference" in assets.title
    assert len(assets.scripts) == 2 and len(assets.styles) == 1
    for url in [*assets.scripts, *assets.styles]:
        assert url and url.startswith("/") and not url.startswith("//"), f"not served by this server: {url}"
        asset = await api.get(url)
        assert asset.code == 200 and len(asset.body) > 100, url
        assert asset.headers["Content-Type"].split(";")[0] in (
            "text/javascript",
            "application/javascript",
            "text/css",
        ), url
    bundle = await api.get(assets.scripts[0])
    assert b"SwaggerUIBundle" in bundle.body


@gen_test
async def test_docs_assets_are_only_the_listed_files(api):
    assert (await api.get("/docs/index.html")).code == 404
    assert (await api.get("/docs/..%2F__init__.py")).code == 404


@gen_test
async def test_site_root_sends_people_to_the_docs(api):
    root = await api.get("/")
    assert root.code == 302 and root.headers["Location"] == "/docs"
    followed = await api.get("/", follow_redirects=True)
    assert followed.code == 200 and b"swagger-ui" in followed.body
