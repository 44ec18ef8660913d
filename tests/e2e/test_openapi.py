"""The OpenAPI document (demo/static/openapi.yaml) is valid and describes exactly what the app serves.

Both directions are asserted: every route and handler method is an operation of the spec (with the
security its auth decision implies), and every operation of the spec is a route and a method the app
implements.
"""

from __future__ import annotations

import re
from functools import partial
from importlib import resources
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from tornado.routing import URLSpec

from demo.common.web.auth import Auth, auth_of, implemented_methods
from demo.common.web.routing import collect_routes

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
SPEC_URI = "urn:demo:openapi"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    text = resources.files("demo").joinpath("static/openapi.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def app_routes() -> list[URLSpec]:
    """Routed operations: everything but the catch-alls (the JSON 404 last, the HTML 404 under /h5/)."""
    routes = collect_routes()
    assert routes[-1].regex.pattern == r"/.*$", "collect_routes() should end with the JSON 404 catch-all"
    operations = [route for route in routes if not route.regex.pattern.endswith("/.*$")]
    assert len(operations) >= 20, "collect_routes() found too few routes to compare with the spec"
    return operations


# -- comparing Tornado route patterns with OpenAPI path templates ---------------------------------
# Both sides are reduced to one form: literal text, with every parameter written as "{}".
#   OpenAPI: "/images/{id}.{ext}"                          -> "/images/{}.{}"
#   Tornado: r"^/images/([A-Za-z0-9_-]{22,64})\.(jpg|png)$" -> "/images/{}.{}"
# For Tornado patterns: drop the ^/$ anchors, turn each top-level capturing group (named or not,
# whatever it contains) into "{}", and unescape "\x" to "x". Any other regex syntax outside a
# group ([...], *, +, ?, |, {n}, (?:...)) is refused, so a pattern this cannot read fails loudly
# instead of being compared wrongly. A bare "." is taken literally (r"/openapi.yaml").


def template_from_route(pattern: str) -> str:
    body = pattern.removeprefix("^").removesuffix("$")
    out: list[str] = []
    depth = i = 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            if depth == 0:
                out.append(body[i + 1])
            i += 2
            continue
        if char == "(":
            if depth == 0:
                if body.startswith("(?", i) and not body.startswith("(?P<", i):
                    raise ValueError(f"unsupported group in route {pattern!r}")
                out.append("{}")
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0:
            if char in "[]{}*+?|^$":
                raise ValueError(f"unsupported regex syntax {char!r} in route {pattern!r}")
            out.append(char)
        i += 1
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in route {pattern!r}")
    return "".join(out)


def template_from_spec(path: str) -> str:
    return re.sub(r"\{[^{}]+\}", "{}", path)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"/users/login", "/users/login"),
        (r"/openapi.yaml", "/openapi.yaml"),
        (r"^/images/([A-Za-z0-9_-]{22,64})$", "/images/{}"),
        (r"/images/(?P<id>[A-Za-z0-9_-]{22,64})\.(jpg|png|gif|webp)", "/images/{}.{}"),
    ],
)
def test_route_conversion(pattern: str, expected: str) -> None:
    assert template_from_route(pattern) == expected


@pytest.mark.parametrize("pattern", [r"/users/?", r"/a|/b", r"/x(?:y)"])
def test_route_conversion_refuses_what_it_cannot_read(pattern: str) -> None:
    with pytest.raises(ValueError):
        template_from_route(pattern)


# -- the document --------------------------------------------------------------------------------


def test_spec_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_every_route_is_in_the_spec(spec: dict[str, Any]) -> None:
    documented = {template_from_spec(path) for path in spec["paths"]}
    missing = [r.regex.pattern for r in app_routes() if template_from_route(r.regex.pattern) not in documented]
    assert not missing, f"routes not described in openapi.yaml: {missing}"


def test_every_operation_in_the_spec_is_served(spec: dict[str, Any]) -> None:
    served = {
        (template_from_route(r.regex.pattern), method.lower())
        for r in app_routes()
        for method in implemented_methods(r.target)
    }
    missing = [
        f"{method.upper()} {path}"
        for path, method, _ in operations(spec)
        if (template_from_spec(path), method) not in served
    ]
    assert not missing, f"operations of openapi.yaml that no handler implements: {missing}"


def test_every_handler_method_is_an_operation_with_matching_security(spec: dict[str, Any]) -> None:
    by_template = {template_from_spec(path): item for path, item in spec["paths"].items()}
    problems = []
    for route in app_routes():
        pattern = route.regex.pattern
        item = by_template.get(template_from_route(pattern), {})
        for method, impl in implemented_methods(route.target).items():
            auth = auth_of(impl)
            operation = item.get(method.lower())
            if operation is None:
                problems.append(f"{method} {pattern}: not in the spec")
                continue
            schemes = [set(req) for req in operation.get("security", spec.get("security", []))]
            anonymous = not schemes or set() in schemes
            h5_cookie = any("h5Cookie" in req for req in schemes)
            ok = (
                {
                    Auth.PUBLIC: anonymous,
                    Auth.SESSION: not anonymous and {"bearerAuth"} in schemes,
                    Auth.H5_SESSION: h5_cookie and not anonymous,
                    # The H5 home page: a one-time ticket (no credential the spec can name) or the cookie.
                    Auth.SELF: h5_cookie and anonymous,
                }.get(auth, False)
                if auth
                else False
            )
            if not ok:
                problems.append(f"{method} {pattern}: handler is {auth}, spec security is {schemes}")
    assert not problems, "\n".join(problems)


def test_examples_match_their_schemas(spec: dict[str, Any]) -> None:
    """Media-type `example`s and named schemas' `examples` agree with the schemas they illustrate."""
    registry = Registry().with_resource(SPEC_URI, Resource.from_contents(spec, DRAFT202012))

    def check(instance: Any, pointer: str) -> None:
        validator = OAS31Validator(
            {"$ref": f"{SPEC_URI}#{pointer}"}, registry=registry, format_checker=OAS31Validator.FORMAT_CHECKER
        )
        errors = [f"{pointer}: {e.message}" for e in validator.iter_errors(instance)]
        assert not errors, "\n".join(errors)

    def escape(key: str) -> str:
        return str(key).replace("~", "~0").replace("/", "~1")

    checked = 0

    def walk(node: Any, pointer: str) -> None:
        nonlocal checked
        if isinstance(node, dict):
            if "schema" in node and "example" in node:
                check(node["example"], f"{pointer}/schema")
                checked += 1
            for key, value in node.items():
                walk(value, f"{pointer}/{escape(key)}")

    walk(spec["paths"], "/paths")
    walk(spec["components"]["responses"], "/components/responses")
    for name, schema in spec["components"]["schemas"].items():
        for example in schema.get("examples", []):
            check(example, f"/components/schemas/{escape(name)}")
            checked += 1
    assert checked > 10


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def test_operations_are_documented(spec: dict[str, Any]) -> None:
    """Each operation has an operationId and a summary; each error answer has a body schema."""
    problems = []
    for path, method, op in operations(spec):
        where = f"{method.upper()} {path}"
        if not op.get("operationId") or not op.get("summary"):
            problems.append(f"{where}: operationId and summary are required")
        for status, response in op["responses"].items():
            if method == "head" or (status != "default" and status[0] not in "45"):
                continue  # HEAD answers never carry a body
            content = resolve(spec, response).get("content", {})
            if not content or not all("schema" in media for media in content.values()):
                problems.append(f"{where} {status}: an error response without a body schema")
    assert not problems, "\n".join(problems)


def test_links_point_at_operations(spec: dict[str, Any]) -> None:
    """The validator does not follow links: check their operationIds and path/query parameters here."""
    by_id = {op["operationId"]: (path, op) for path, _, op in operations(spec)}
    links = list(spec["components"].get("links", {}).items())
    for path, method, op in operations(spec):
        for status, response in op["responses"].items():
            for name, link in resolve(spec, response).get("links", {}).items():
                links.append((f"{method.upper()} {path} {status} {name}", link))
    assert links
    problems = []
    for where, link in links:
        link = resolve(spec, link)
        if link.get("operationId") not in by_id:
            problems.append(f"{where}: unknown operationId {link.get('operationId')!r}")
            continue
        path, target = by_id[link["operationId"]]
        params = target.get("parameters", []) + spec["paths"][path].get("parameters", [])
        declared = {(p["in"], p["name"]) for p in map(partial(resolve, spec), params)}
        for key in link.get("parameters", {}):
            location, _, name = key.partition(".")
            # header.Authorization stands for the bearerAuth credential, which OpenAPI will not
            # let an operation declare as a parameter.
            if location in ("path", "query") and (location, name) not in declared:
                problems.append(f"{where}: {link['operationId']} has no {location} parameter {name!r}")
    assert not problems, "\n".join(problems)
