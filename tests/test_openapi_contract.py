"""/openapi.json against the server's answers (tester hCW): every answer's status is documented for its operation,
its content type is one the document gives, and its JSON body validates against the documented schema; and the
requests the document describes are the ones the server takes. In process on the fake runtime (tests/fake_runtime.py),
a Triton-style repository, with and without an API key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import fake_runtime
import httpx
import numpy as np
import pytest
from PIL import Image
from test_repository_lifecycle import CONFIG, NAME, add_version
from test_serve_fixtures import encode

from serve.settings import Settings

KEY = "contract-key"
HEADER = "Inference-Header-Content-Length"
CLASSIFY, INFER = "/v1/models/{name}/classify", "/v2/models/{name}/infer"
VERSIONED_INFER = "/v2/models/{name}/versions/{version}/infer"
INDEX, LOAD, UNLOAD = ("/v2/repository/index", "/v2/repository/models/{name}/load",
                       "/v2/repository/models/{name}/unload")
MODEL_ROUTES = ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/stats", "/v2/models/{name}/config")
VERSIONED_ROUTES = tuple(t.replace("{name}", "{name}/versions/{version}") for t in MODEL_ROUTES)


# --- the JSON Schema subset the document uses (jsonschema is not a dependency) ---------------------------------------

_ANNOTATIONS = {"title", "description", "example", "examples", "format", "default", "contentMediaType"}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    """Whether `value` (parsed JSON) is of JSON Schema type `kind` (a boolean is no number)."""
    if kind in ("integer", "number"):
        numeric = isinstance(value, int) or (kind == "number" and isinstance(value, float))
        return numeric and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def _resolve(doc: dict, schema: dict) -> dict:
    """`schema` with its local $ref followed."""
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def violations(doc: dict, schema: dict, value: Any, at: str = "$") -> list[str]:
    """Where `value` breaks `schema`; a keyword this validator does not know fails the test rather than pass it."""
    schema = _resolve(doc, schema)
    unknown = set(schema) - _ANNOTATIONS - {"type", "required", "properties", "additionalProperties", "items",
                                            "anyOf", "oneOf", "allOf", "enum", "const", "minimum", "maximum",
                                            "maxLength", "maxItems", "propertyNames", "not", "pattern"}
    assert not unknown, f"the test's validator does not know {sorted(unknown)} (at {at})"
    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return [f"{at}: {value!r:.60} is not of type {kinds}"]
    out = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{at}: {value!r:.60} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{at}: {value!r:.60} is not {schema['const']!r}")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:
        out.append(f"{at}: {value} < {schema['minimum']}")
    if "maximum" in schema and _is(value, "number") and value > schema["maximum"]:
        out.append(f"{at}: {value} > {schema['maximum']}")
    if "maxLength" in schema and isinstance(value, str) and len(value) > schema["maxLength"]:
        out.append(f"{at}: {len(value)} characters > {schema['maxLength']}")
    if "maxItems" in schema and isinstance(value, list) and len(value) > schema["maxItems"]:
        out.append(f"{at}: {len(value)} items > {schema['maxItems']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        out.append(f"{at}: {value!r:.60} does not match {schema['pattern']!r}")
    if "not" in schema and not violations(doc, schema["not"], value, at):
        out.append(f"{at}: {value!r:.60} matches what 'not' excludes")
    if "propertyNames" in schema and isinstance(value, dict):
        out += [f"{at}: key {k!r:.60}: {v}" for k in value for v in violations(doc, schema["propertyNames"], k, at)]
    if isinstance(value, dict):
        out += [f"{at}: {key!r} is required" for key in schema.get("required", ()) if key not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                out += violations(doc, props[key], item, f"{at}.{key}")
            elif extra is False:
                out.append(f"{at}: {key!r} is not allowed")
            elif isinstance(extra, dict):
                out += violations(doc, extra, item, f"{at}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += violations(doc, schema["items"], item, f"{at}[{i}]")
    for sub in schema.get("allOf", ()):
        out += violations(doc, sub, value, at)
    for word, fits in (("anyOf", lambda n: n >= 1), ("oneOf", lambda n: n == 1)):
        if word in schema and not fits(sum(not violations(doc, s, value, at) for s in schema[word])):
            out.append(f"{at}: {value!r:.60} does not match {word} {schema[word]}")
    return out


def test_the_validator_refuses_what_it_should():
    doc = {"components": {"schemas": {"E": {"type": "object", "required": ["error"],
                                            "properties": {"error": {"type": "string"}}}}}}
    ref = {"$ref": "#/components/schemas/E"}
    assert violations(doc, ref, {"error": "x"}) == []
    assert violations(doc, ref, {"detail": []}) and violations(doc, ref, {"error": 1}) and violations(doc, ref, [])
    assert violations(doc, {"type": "integer"}, True) and violations(doc, {"type": "number"}, False)
    assert violations(doc, {"anyOf": [{"type": "string"}, {"type": "null"}]}, 3)
    assert violations(doc, {"type": "array", "items": {"enum": [1]}}, [1, 2])
    assert violations(doc, {"maxLength": 2}, "abc") and not violations(doc, {"maxLength": 3}, "abc")
    assert violations(doc, {"maxItems": 1}, [1, 2]) and not violations(doc, {"maxItems": 2}, [1, 2])
    assert violations(doc, {"propertyNames": {"not": {"pattern": "^t_"}}}, {"t_x": 1})
    assert not violations(doc, {"propertyNames": {"not": {"pattern": "^t_"}}}, {"x_t_": 1})
    with pytest.raises(AssertionError, match="does not know"):
        violations(doc, {"minLength": 1}, "x")


# --- the server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract") / "repo"
    add_version(root, NAME, "1")
    (root / NAME / "config.pbtxt").write_text(CONFIG)
    return root


def _client(repo, **settings: Any) -> Iterator[httpx.Client]:
    from fastapi.testclient import TestClient

    from serve.app import create_app

    with fake_runtime.registered():
        with TestClient(create_app(Settings(model_control_mode="explicit",
                                            model_repository=repo, access_log=False, graceful_timeout_s=5,
                                            **settings))) as c:
            yield c


@pytest.fixture(scope="module")
def client(repo):
    yield from _client(repo)


@pytest.fixture(scope="module")
def keyed(repo):
    yield from _client(repo, api_key=KEY)


@pytest.fixture(scope="module")
def doc(client) -> dict:
    return client.get("/openapi.json").json()


def operation(doc: dict, method: str, template: str) -> dict:
    return doc["paths"][template][method.lower()]


def answered(doc: dict, template: str, r: httpx.Response) -> httpx.Response:
    """`r` checked against the document's operation at `template`: its status documented, its content type one the
    documented response gives, and its JSON body valid against that response's schema."""
    op = operation(doc, r.request.method, template)
    response = op["responses"].get(str(r.status_code))
    assert response is not None, (f"{r.request.method} {template}: status {r.status_code} is not documented "
                                  f"({sorted(op['responses'])}): {r.text[:200]}")
    media = (r.headers.get("content-type") or "").split(";")[0]
    content = response.get("content", {})
    assert media in content, f"{r.request.method} {template} {r.status_code}: {media} not in {list(content)}"
    if media == "application/json":
        assert "schema" in content[media], f"{r.request.method} {template} {r.status_code}: no schema"
        wrong = violations(doc, content[media]["schema"], r.json())
        assert not wrong, f"{r.request.method} {template} {r.status_code}: {wrong} in {r.text[:200]}"
    return r


def request_fits(doc: dict, method: str, template: str, media: str, body: Any = None) -> None:
    """The request body (of `media`) is one the operation declares, and a JSON one validates against its schema."""
    declared = operation(doc, method, template).get("requestBody", {}).get("content", {})
    assert media in declared, f"{method} {template}: a {media} body is not declared ({list(declared)})"
    if media == "application/json":
        assert not violations(doc, declared[media]["schema"], body), (body, declared[media]["schema"])


def _png() -> bytes:
    return encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)), "PNG")


def _tensor_body(**extra: Any) -> dict:
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    return {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


# --- 1. readiness: 400 {"ready": false}, as Triton ---------------------------------------------------------------

def test_not_ready_answers_are_documented_with_their_shape(client, doc):
    for path, template in (("/v2/health/ready", "/v2/health/ready"), (f"/v2/models/{NAME}/ready",
                                                                      "/v2/models/{name}/ready")):
        answered(doc, template, client.get(path))  # ready: 200
    client.app.state.ready = False  # what a stop's first signal sets, through --shutdown-delay (serve.shutdown)
    try:
        r = answered(doc, "/v2/health/ready", client.get("/v2/health/ready"))
        assert (r.status_code, r.json()) == (400, {"ready": False})
        r = answered(doc, "/v2/models/{name}/ready", client.get(f"/v2/models/{NAME}/ready"))
        assert (r.status_code, r.json()) == (400, {"name": NAME, "ready": False})
    finally:
        client.app.state.ready = True
    answered(doc, "/v2/models/{name}/ready", client.get("/v2/models/nope/ready"))  # 404


# --- 2. 401 on every secured operation ----------------------------------------------------------------------------

def test_every_secured_operation_documents_its_401_and_the_open_ones_none(keyed):
    spec = keyed.get("/openapi.json").json()
    assert spec["security"] == [{"bearer": []}]
    secured = 0
    for template, methods in spec["paths"].items():
        for method, op in methods.items():
            if op.get("security", spec["security"]) == []:
                assert "401" not in op["responses"], (method, template)
                continue
            secured += 1
            assert "401" in op["responses"], f"{method} {template} answers 401 without documenting it"
            assert "WWW-Authenticate" in op["responses"]["401"].get("headers", {}), (method, template)
    assert secured == 19  # all but the two health paths
    for method, path, template in (("GET", "/v1/models", "/v1/models"), ("GET", "/v2", "/v2"),
                                   ("GET", "/metrics", "/metrics"), ("GET", "/v2/models/stats", "/v2/models/stats"),
                                   ("GET", f"/v2/models/{NAME}/config", "/v2/models/{name}/config"),
                                   ("POST", "/v2/repository/index", INDEX),
                                   ("POST", f"/v2/repository/models/{NAME}/unload", UNLOAD),
                                   ("POST", f"/v2/models/{NAME}/infer", INFER)):
        r = answered(spec, template, keyed.request(method, path, headers={"Authorization": "Bearer wrong"}))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    for path in ("/v2/health/ready", "/v2/health/live"):
        assert keyed.get(path).status_code == 200


def test_without_a_key_no_operation_documents_a_401(doc):
    assert "security" not in doc
    assert not [(m, t) for t, ms in doc["paths"].items() for m, op in ms.items() if "401" in op["responses"]]


# --- 3. the repository API ----------------------------------------------------------------------------------------

def test_repository_bodies_are_declared_with_the_keys_the_server_reads(doc):
    index = operation(doc, "POST", INDEX)["requestBody"]
    assert index["required"] is False
    schema = index["content"]["application/json"]["schema"]
    assert schema["properties"]["ready"]["type"] == "boolean"
    for template, key in ((LOAD, "config"), (UNLOAD, "unload_dependents")):
        body = operation(doc, "POST", template)["requestBody"]
        assert body["required"] is False
        params = _resolve(doc, body["content"]["application/json"]["schema"]["properties"]["parameters"])
        assert key in params["properties"], (template, params)
    assert violations(doc, schema, {"ready": "yes"})


def test_repository_answers_are_documented(client, doc):
    for body in ({"ready": True}, {"ready": False}, {}):
        request_fits(doc, "POST", INDEX, "application/json", body)
        answered(doc, INDEX, client.post("/v2/repository/index", json=body))
    assert answered(doc, INDEX, client.post("/v2/repository/index")).status_code == 200
    for body in (b'{"ready": "yes"}', b"{{", b"[]", b'{"ready": true, "ready": false}'):
        assert answered(doc, INDEX, client.post("/v2/repository/index", content=body)).status_code == 400
    big = b" " * 70_000 + b"{}"
    for template, path in ((INDEX, "/v2/repository/index"), (LOAD, f"/v2/repository/models/{NAME}/load"),
                           (UNLOAD, f"/v2/repository/models/{NAME}/unload")):
        assert answered(doc, template, client.post(path, content=big)).status_code == 413
    for template, path, body in ((LOAD, "/v2/repository/models/nope/load", None),
                                 (LOAD, f"/v2/repository/models/{NAME}/load", {"parameters": {"config": "{}"}}),
                                 (LOAD, f"/v2/repository/models/{NAME}/load", {"parameters": []}),
                                 (UNLOAD, f"/v2/repository/models/{NAME}/unload",
                                  {"parameters": {"unload_dependents": "yes"}})):
        assert answered(doc, template, client.post(path, json=body)).status_code == 400, (path, body)
    reload = {"parameters": {"note": "a string", "n": 2, "b": True}}
    request_fits(doc, "POST", LOAD, "application/json", reload)
    assert answered(doc, LOAD, client.post(f"/v2/repository/models/{NAME}/load", json=reload)).status_code == 200
    gone = {"parameters": {"unload_dependents": False}}
    request_fits(doc, "POST", UNLOAD, "application/json", gone)
    try:
        assert answered(doc, UNLOAD, client.post(f"/v2/repository/models/{NAME}/unload", json=gone)).is_success
        for template in MODEL_ROUTES:  # a model that is not loaded: 404 for each, /config included
            assert answered(doc, template, client.get(template.format(name=NAME))).status_code == 404
        answered(doc, INDEX, client.post("/v2/repository/index"))  # its UNAVAILABLE entry, with a reason
    finally:
        assert client.post(f"/v2/repository/models/{NAME}/load").status_code == 200


def test_model_routes_document_what_they_answer(client, doc):
    for template in (*MODEL_ROUTES, "/v1/models/{name}"):
        assert answered(doc, template, client.get(template.format(name=NAME))).status_code == 200
        assert answered(doc, template, client.get(template.format(name="nope"))).status_code == 404
    for path in ("/v1/models", "/v2", "/v2/models/stats", "/v2/health/live", "/metrics"):
        assert answered(doc, path, client.get(path)).status_code == 200
    assert operation(doc, "GET", "/metrics")["responses"]["200"]["content"] == {"text/plain": {"schema": {
        "type": "string"}}}


# --- 4. /v1 classify: what it takes -------------------------------------------------------------------------------

def test_classify_declares_every_raw_body_type_the_server_takes(client, doc):
    from serve.imaging import IMAGE_CONTENT_TYPES

    declared = set(operation(doc, "POST", CLASSIFY)["requestBody"]["content"])
    assert declared == {"multipart/form-data", *IMAGE_CONTENT_TYPES}
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for media, fmt in (("image/gif", "GIF"), ("image/bmp", "BMP"), ("image/tiff", "TIFF"),
                       ("application/octet-stream", "PNG"), ("image/png", "PNG")):
        request_fits(doc, "POST", CLASSIFY, media)
        r = answered(doc, CLASSIFY, client.post(f"/v1/models/{NAME}/classify", content=encode(img, fmt),
                                                 headers={"content-type": media}))
        assert r.status_code == 200, (media, r.text)
    r = answered(doc, CLASSIFY, client.post(f"/v1/models/{NAME}/classify", content=b"x", headers={
        "content-type": "text/plain"}))
    assert r.status_code == 415 and "application/octet-stream" in r.json()["error"]


def test_the_multipart_encoding_declares_exactly_the_part_types_taken(client, doc):
    from serve.imaging import CONTENT_TYPES

    encoding = operation(doc, "POST", CLASSIFY)["requestBody"]["content"]["multipart/form-data"]["encoding"]
    declared = encoding["file"]["contentType"].split(", ")
    assert set(declared) == CONTENT_TYPES
    png, url = _png(), f"/v1/models/{NAME}/classify"
    for media in declared:
        r = answered(doc, CLASSIFY, client.post(url, files=[("file", ("a.png", png, media))]))
        assert r.status_code == 200, (media, r.text)
    for media in ("image/*", "image/heic", "image/svg+xml"):
        r = answered(doc, CLASSIFY, client.post(url, files=[("file", ("a.png", png, media))]))
        assert r.status_code == 415, (media, r.text)


def test_a_part_s_headers_past_the_parser_s_limits_are_said_so(client, doc):
    """python-multipart bounds a part's header lines (4,224 bytes each, 8 of them: the defaults Starlette parses
    with); Starlette says only "Invalid multipart data." of any of its errors."""
    url, png = f"/v1/models/{NAME}/classify", _png()
    r = answered(doc, CLASSIFY, client.post(url, files=[("file", ("a" * 4000 + ".png", png, "image/png"))]))
    assert r.status_code == 200, r.text
    r = answered(doc, CLASSIFY, client.post(url, files=[("file", ("a" * 8000 + ".png", png, "image/png"))]))
    said = "malformed multipart body: a part's header line is longer than 4224 bytes (the form parser's limit"
    assert r.status_code == 400 and r.json()["error"].startswith(said), r.text
    extra = b"".join(b"X-%d: 1\r\n" % i for i in range(8))
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n' + extra + b"\r\n" + png
            + b"\r\n--b--\r\n")
    r = answered(doc, CLASSIFY, client.post(url, content=body, headers={"content-type": "multipart/form-data; "
                                                                                          "boundary=b"}))
    assert (r.status_code, r.json()["error"]) == (400, "malformed multipart body: a part has more than 8 header "
                                                       "lines (the limit)")


@pytest.mark.parametrize("media", ["image/png", "application/octet-stream", "image/png; name=x"])
def test_a_file_part_typed_as_an_image_needs_no_filename(client, doc, media):
    """httpx's files=[("file", (None, data, type))] and openapi-python-client's File(payload, mime_type=...) send no
    filename; RFC 7578 makes it optional. The part's type says it is a file."""
    png = _png()
    r = client.post(f"/v1/models/{NAME}/classify", files=[("file", (None, png, media))])
    assert r.status_code == 200 and r.json()["model"] == NAME, r.text
    answered(doc, CLASSIFY, r)
    named = client.post(f"/v1/models/{NAME}/classify", files=[("file", ("a.png", png, "image/png"))]).json()
    assert r.json() == named
    r = client.post(f"/v1/models/{NAME}/classify", files=[("file", (None, png, media)), ("file", ("b.png", png))])
    assert r.status_code == 200 and r.json() == [named, named]


@pytest.mark.parametrize("part", [(None, "abc"), (None, b"abc", "text/plain"),
                                  (None, b"abc", "application/x-www-form-urlencoded")])
def test_a_text_field_named_file_is_still_refused_as_one(client, doc, part):
    r = client.post(f"/v1/models/{NAME}/classify", files=[("file", part)])
    assert r.status_code == 422 and "has no filename, so it is a text field" in r.json()["error"], r.text
    answered(doc, CLASSIFY, r)


def test_classify_errors_have_the_documented_shape(client, doc):
    url = f"/v1/models/{NAME}/classify"
    png = _png()
    for r, status in ((client.post(url, params={"top_k": "0"}, content=png, headers={"content-type": "image/png"}),
                       422),
                      (client.post(url, content=b"not an image", headers={"content-type": "image/png"}), 400),
                      (client.post("/v1/models/nope/classify", content=png, headers={"content-type": "image/png"}),
                       404),
                      (client.post(url, files=[("other", ("a.png", png, "image/png"))]), 422)):
        assert answered(doc, CLASSIFY, r).status_code == status, r.text
    assert answered(doc, CLASSIFY, client.post(url, content=png, headers={"content-type": "image/png"})).is_success


# --- 5. infer: JSON or binary answers -----------------------------------------------------------------------------

def test_infer_documents_its_binary_answer_and_its_header(client, doc):
    for template in (INFER, VERSIONED_INFER):
        ok = operation(doc, "POST", template)["responses"]["200"]
        assert {"application/json", "application/octet-stream"} <= set(ok["content"]), template
        assert HEADER in ok.get("headers", {}), template
    url = f"/v2/models/{NAME}/infer"
    r = answered(doc, INFER, client.post(url, json=_tensor_body()))
    assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
    for body in (_tensor_body(outputs=[{"name": "logits", "parameters": {"binary_data": True}}]),
                 _tensor_body(parameters={"binary_data_output": True})):
        r = answered(doc, INFER, client.post(url, json=body))
        assert r.headers["content-type"] == "application/octet-stream"
        head = json.loads(r.content[:int(r.headers[HEADER])])
        assert not violations(doc, ok_json_schema(doc, INFER), head)
    x = np.zeros((1, 3, 32, 32), np.float32)
    r = answered(doc, INFER, client.post(url, content=x.tobytes(), headers={HEADER: "0"}))
    assert r.headers["content-type"] == "application/octet-stream" and int(r.headers[HEADER]) > 0
    r = client.post(f"/v2/models/{NAME}/versions/1/infer", json=_tensor_body(outputs=[
        {"name": "logits", "parameters": {"classification": 2}}]))
    assert answered(doc, VERSIONED_INFER, r).json()["outputs"][0]["datatype"] == "BYTES"


def ok_json_schema(doc: dict, template: str) -> dict:
    """The schema of the operation's 200 JSON answer (also the JSON header of its binary answer)."""
    return operation(doc, "POST", template)["responses"]["200"]["content"]["application/json"]["schema"]


def test_infer_errors_have_the_documented_shape(client, doc):
    url = f"/v2/models/{NAME}/infer"
    for r, status in ((client.post(url, content=b"{{"), 400), (client.post(url, json={"inputs": []}), 400),
                      (client.post("/v2/models/nope/infer", json=_tensor_body()), 404),
                      (client.post(url, content=b"x", headers={"content-encoding": "br"}), 415)):
        assert answered(doc, INFER, r).status_code == status, r.text
    r = client.post(f"/v2/models/{NAME}/versions/9/infer", json=_tensor_body())
    assert answered(doc, VERSIONED_INFER, r).status_code == 404


# --- 6. one error shape, and no 422 the server never sends --------------------------------------------------------

def test_every_error_response_has_the_error_schema(doc):
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["type"] == "string"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for template, methods in doc["paths"].items():
        for method, op in methods.items():
            for status, response in op["responses"].items():
                if int(status) < 400 or (template.endswith("/ready") and status == "400"):  # {"ready": false}
                    continue
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, template, status, response)
    never = [("GET", t) for t in (*MODEL_ROUTES, "/v1/models/{name}")] + [("POST", LOAD), ("POST", UNLOAD)]
    for method, template in never:  # nothing there answers 422
        assert "422" not in operation(doc, method, template)["responses"], template


def test_fastapi_validation_refusals_are_documented_in_the_server_s_shape():
    """A route FastAPI can refuse (an integer query parameter) documents that 422 as the server answers it: the Error
    shape with its `detail`."""
    from fastapi import FastAPI
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    from serve.app import document_validation
    from serve.responses import install_handlers
    from serve.routes.deps import NOT_SERVED

    app = FastAPI()
    install_handlers(app)

    @app.get("/n", responses={404: NOT_SERVED})
    async def n(k: int) -> dict[str, int]:
        return {"k": k}

    @app.get("/s/{name}")
    async def s(name: str) -> dict[str, str]:
        return {"name": name}

    document_validation(app, [r for r in app.router.routes if isinstance(r, APIRoute)])
    with TestClient(app) as c:
        spec = c.get("/openapi.json").json()
        r = c.get("/n", params={"k": "x"})
        assert r.status_code == 422 and r.json()["detail"]
        answered(spec, "/n", r)
        assert "422" not in operation(spec, "GET", "/s/{name}")["responses"]
        assert "HTTPValidationError" not in spec["components"]["schemas"]


# --- 7. no `version` query parameter; the version path parameter is a string -------------------------------------

def test_unversioned_routes_take_no_version_query_parameter(client, doc):
    for template, method in ((INFER, "post"), *((t, "get") for t in MODEL_ROUTES)):
        names = [(p["name"], p["in"]) for p in doc["paths"][template][method].get("parameters", [])]
        assert names == [("name", "path")], (template, names)
    version = next(p for p in operation(doc, "POST", VERSIONED_INFER)["parameters"] if p["name"] == "version")
    assert version["required"] is True and version["schema"]["type"] == "string" and "anyOf" not in version["schema"]
    # As Triton, which reads the version from the path only: a query string is not part of the request's meaning.
    for template in MODEL_ROUTES:
        r = client.get(template.format(name=NAME), params={"version": "9"})
        assert r.status_code == 200, (template, r.text)
    assert client.post(f"/v2/models/{NAME}/infer", params={"version": "9"}, json=_tensor_body()).status_code == 200
    for path in (f"/v2/models/{NAME}/versions/9", f"/v2/models/{NAME}/versions/9/ready"):
        assert client.get(path).status_code == 404
    assert client.get(f"/v2/models/{NAME}/versions/01/config").status_code == 200


# --- 8. repository bodies are JSON as infer reads it --------------------------------------------------------------

@pytest.mark.parametrize(("body", "says"), [
    (b'{"parameters": {"a": NaN}}', "NaN is not a number in JSON"),
    (b'{"parameters": {"a": -Infinity}}', "-Infinity is not a number in JSON"),
    (b'{"parameters": {"a": 1e999}}', "beyond every float"),
    (b'{"parameters": {"a": ' + b"1" * 5000 + b"}}", "4300 digits"),
])
def test_repository_bodies_refuse_what_infer_refuses(client, doc, body, says):
    for template in (LOAD, UNLOAD):
        r = answered(doc, template, client.post(template.format(name=NAME), content=body))
        assert r.status_code == 400 and says in r.json()["error"], (template, r.text)
    assert client.get(f"/v2/models/{NAME}/ready").status_code == 200  # nothing was unloaded
    r = client.post(f"/v2/models/{NAME}/infer", content=json.dumps(_tensor_body()).encode()[:-1] + b', "x": NaN}')
    assert r.status_code == 400 and "NaN is not a number in JSON" in r.json()["error"]


# --- 9. the request schemas declare the limits the server enforces (one constant each) --------------------------

def _with_output(**parameters: Any) -> dict:
    return _tensor_body(outputs=[{"name": "logits", "parameters": parameters}])


def _with_input(**changes: Any) -> dict:
    body = _tensor_body()
    body["inputs"][0].update(changes)
    return body


@pytest.mark.parametrize("body", [
    _tensor_body(id="x" * 65_537), _with_input(shape=[1] * 9), _with_input(shape=[1, 3, 32, 2**31 + 1]),
    _with_input(parameters={"binary_data_size": -1}), _with_input(parameters={"a": [1]}),
    _tensor_body(parameters={"x": {"a": 1}}), _tensor_body(parameters={"triton_x": 1}),
    _tensor_body(parameters={"sequence_id": -1}), _tensor_body(parameters={"sequence_id": 2**64}),
    _tensor_body(parameters={"priority": -1}), _tensor_body(parameters={"priority": "1"}),
    _tensor_body(parameters={"timeout": 1.5}), _tensor_body(parameters={"sequence_start": 1}),
    _tensor_body(parameters={"binary_data_output": "yes"}),
    _with_output(classification=-1), _with_output(classification=True), _with_output(classification=2.0),
    _with_output(classification=2**63), _with_output(binary_data=1), _with_output(x=None),
], ids=lambda body: json.dumps({k: v for k, v in body.items() if k != "inputs"} or body["inputs"][0].get(
    "parameters") or body["inputs"][0]["shape"])[:60])
def test_the_infer_schema_refuses_what_the_server_refuses(client, doc, body):
    declared = operation(doc, "POST", INFER)["requestBody"]["content"]["application/json"]["schema"]
    assert violations(doc, declared, body), "the document declares a body the server refuses"
    r = answered(doc, INFER, client.post(f"/v2/models/{NAME}/infer", json=body))
    assert r.status_code == 400, r.text


def test_the_infer_schema_takes_what_the_server_takes(client, doc):
    for body in (_tensor_body(id="x" * 65_536), _tensor_body(parameters={
                     "sequence_id": "s", "priority": 2**64 - 1, "timeout": 0, "sequence_start": True,
                     "sequence_end": False, "binary_data_output": False, "own": 1.5, "x_triton_": "a"}),
                 _tensor_body(parameters={"sequence_id": 2**64 - 1}),
                 _with_output(classification=2**63 - 1, binary_data=False, own="a")):
        request_fits(doc, "POST", INFER, "application/json", body)
        assert answered(doc, INFER, client.post(f"/v2/models/{NAME}/infer", json=body)).status_code == 200


def test_the_multipart_file_count_is_the_server_s_max_files(repo, client, doc):
    from serve.app import create_app

    def declared(spec: dict) -> int:
        form = operation(spec, "POST", CLASSIFY)["requestBody"]["content"]["multipart/form-data"]
        return form["schema"]["properties"]["file"]["maxItems"]

    assert declared(doc) == Settings.model_fields["max_files"].default
    two, three = (create_app(Settings(model_control_mode="explicit",
                                      model_repository=repo, access_log=False, max_files=n)) for n in (2, 3))
    assert (declared(two.openapi()), declared(three.openapi()), declared(two.openapi())) == (2, 3, 2)
    png = _png()
    files = [("file", (f"{i}.png", png, "image/png")) for i in range(declared(doc) + 1)]
    r = answered(doc, CLASSIFY, client.post(f"/v1/models/{NAME}/classify", files=files))
    assert r.status_code == 400, r.text
    assert r.json()["error"] == (f"the form has more than {declared(doc)} files, the most one request may send "
                                 f"(--max-files {declared(doc)}): send the others in another request"), r.text


def test_the_multipart_file_count_is_within_the_queue_size(repo, client):
    """--max-queue-size 3 under --max-files 64: the document said 64, and a client that sent 4..64 files got a 413."""
    from fastapi.testclient import TestClient

    from serve.app import create_app

    # `client` holds the fake runtime registered (a second _client would unregister it on leaving)
    with TestClient(create_app(Settings(model_control_mode="explicit",
                                        model_repository=repo, access_log=False, max_queue_size=3))) as queued:
        spec = queued.get("/openapi.json").json()
        form = operation(spec, "POST", CLASSIFY)["requestBody"]["content"]["multipart/form-data"]
        assert form["schema"]["properties"]["file"]["maxItems"] == 3
        png = _png()
        for count, status in ((3, 200), (4, 413)):
            files = [("file", (f"{i}.png", png, "image/png")) for i in range(count)]
            r = answered(spec, CLASSIFY, queued.post(f"/v1/models/{NAME}/classify", files=files))
            assert r.status_code == status, r.text


# --- 10. every status an operation answers, from the error paths it reaches (serve.routes.deps, serve.app) -----------

INFERENCE = {"200", "400", "404", "413", "415", "422", "500", "503", "504"}  # decode, admission, submit, answer
ANSWERS = {  # (method, template) -> the statuses the route's code can answer (401 with a key: serve.app)
    ("GET", "/v1/models"): {"200"}, ("GET", "/v1/models/{name}"): {"200", "404"}, ("POST", CLASSIFY): INFERENCE,
    ("GET", "/metrics"): {"200"}, ("GET", "/v2"): {"200"}, ("GET", "/v2/health/live"): {"200"},
    ("GET", "/v2/health/ready"): {"200", "400"}, ("GET", "/v2/models/stats"): {"200"},
    ("GET", "/v2/models/{name}"): {"200", "404"}, ("GET", "/v2/models/{name}/ready"): {"200", "400", "404"},
    ("GET", "/v2/models/{name}/stats"): {"200", "404"}, ("GET", "/v2/models/{name}/config"): {"200", "404"},
    ("GET", VERSIONED_ROUTES[0]): {"200", "404"}, ("GET", VERSIONED_ROUTES[1]): {"200", "400", "404"},
    ("GET", VERSIONED_ROUTES[2]): {"200", "404"}, ("GET", VERSIONED_ROUTES[3]): {"200", "404"},
    ("POST", INFER): INFERENCE, ("POST", VERSIONED_INFER): INFERENCE,
    # The index is built in the work pool (off_loop); a load needs a thread (serve.app's ThreadsUnavailable); and a
    # compressed body of each is inflated in the work pool (deps.inflated: 415 for another coding).
    ("POST", INDEX): {"200", "400", "413", "415", "503"},
    ("POST", LOAD): {"200", "400", "413", "415", "503"},
    ("POST", UNLOAD): {"200", "400", "413", "415", "503"},
}


def test_every_operation_declares_every_status_it_answers(doc):
    declared = {(m.upper(), t): set(op["responses"]) for t, ms in doc["paths"].items() for m, op in ms.items()}
    assert set(declared) == set(ANSWERS), "an operation was added or removed: say what it answers in ANSWERS"
    wrong = {op: (declared[op], want) for op, want in ANSWERS.items() if declared[op] != want}
    assert not wrong, wrong
    for (method, template), statuses in declared.items():  # every 503 says when to retry, as the server does
        if "503" in statuses:
            assert "Retry-After" in operation(doc, method, template)["responses"]["503"]["headers"], template


def test_a_load_without_a_thread_answers_its_documented_503(client, doc, monkeypatch):
    """A pids limit met by a load (Python's "can't start new thread"): 503 + Retry-After, as documented."""
    import serve.repository

    def no_thread(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(serve.repository, "load_model", no_thread)
    try:
        r = answered(doc, LOAD, client.post(f"/v2/repository/models/{NAME}/load"))
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    finally:
        monkeypatch.undo()
        assert client.post(f"/v2/repository/models/{NAME}/load").status_code == 200  # its failure given up
    assert client.get("/v2/health/ready").status_code == 200


def test_the_versioned_model_routes_are_documented_as_they_answer(client, doc):
    """KServe v2's GET /v2/models/{name}/versions/{version}[/ready] (and Triton's /config, /stats): in the document,
    with the version a string path parameter, answering as their unversioned twins."""
    for template, plain in zip(VERSIONED_ROUTES, MODEL_ROUTES, strict=True):
        params = {(p["name"], p["in"], p["required"], p["schema"]["type"])
                  for p in operation(doc, "GET", template)["parameters"]}
        assert params == {("name", "path", True, "string"), ("version", "path", True, "string")}, (template, params)
        r = answered(doc, template, client.get(template.format(name=NAME, version="1")))
        assert r.status_code == 200 and r.json() == client.get(plain.format(name=NAME)).json(), template
        for name, version in ((NAME, "2"), ("nope", "1")):
            assert answered(doc, template, client.get(template.format(name=name, version=version))).status_code == 404
    client.app.state.ready = False
    try:
        r = answered(doc, VERSIONED_ROUTES[1], client.get(f"/v2/models/{NAME}/versions/1/ready"))
        assert (r.status_code, r.json()) == (400, {"name": NAME, "ready": False})
    finally:
        client.app.state.ready = True


# --- 11. Content-Encoding lines are one list (RFC 9110 5.3), on /v1 as on /v2 ----------------------------------

@pytest.mark.parametrize("template", [CLASSIFY, INFER])
def test_content_encoding_lines_are_read_as_one_list(client, doc, template):
    import gzip

    url = template.format(name=NAME)
    plain, media = (_png(), "image/png") if template == CLASSIFY else (json.dumps(_tensor_body()).encode(),
                                                                       "application/json")
    once, twice = gzip.compress(plain), gzip.compress(gzip.compress(plain))
    r = answered(doc, template, client.post(url, content=once, headers={"content-type": media,
                                                                        "content-encoding": "gzip"}))
    assert r.status_code == 200, r.text
    for body, lines in ((once, ["gzip", "br"]), (twice, ["gzip", "gzip"]), (twice, ["gzip, gzip"])):
        r = client.post(url, content=body, headers=[("content-type", media),
                                                    *(("content-encoding", line) for line in lines)])
        assert answered(doc, template, r).status_code == 415, (lines, r.text)
        assert "'gzip, " in r.json()["error"], r.text
    # Empty list elements are ignored (RFC 9110 5.6.1.2): each of these is gzip.
    for lines in (["gzip,"], [", gzip"], ["gzip ,"], ["gzip", ""], [" , gzip , "]):
        r = client.post(url, content=once, headers=[("content-type", media),
                                                    *(("content-encoding", line) for line in lines)])
        assert answered(doc, template, r).status_code == 200, (lines, r.text)


@pytest.mark.parametrize("template", [INDEX, LOAD, UNLOAD])
def test_repository_bodies_are_read_through_their_content_encoding(client, doc, template):
    """A gzip body was refused as not valid JSON, and one in `br` was read as identity: they are infer's codings."""
    import gzip
    import zlib

    url = template.format(name=NAME)
    plain = b'{"ready": true}' if template == INDEX else b'{"parameters": {"note": "gzipped"}}'
    try:
        for coding, body in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain)), ("identity", plain)):
            r = client.post(url, content=body, headers={"content-type": "application/json",
                                                        "content-encoding": coding})
            assert answered(doc, template, r).status_code == 200, (coding, r.text)
    finally:  # an unload took: serve the model again
        assert client.post(LOAD.format(name=NAME)).status_code == 200
    for coding in ("br", "gzip, br", "compress"):
        r = client.post(url, content=plain, headers={"content-type": "application/json", "content-encoding": coding})
        assert answered(doc, template, r).status_code == 415, (coding, r.text)
        assert "unsupported Content-Encoding" in r.json()["error"], r.text
    r = answered(doc, template, client.post(url, content=b"\x1f\x8bnot gzip", headers={"content-encoding": "gzip"}))
    assert r.status_code == 400 and "corrupt gzip body" in r.json()["error"], r.text
    bomb = gzip.compress(b" " * 70_000 + plain)  # 200 bytes on the wire: the limit holds once inflated
    r = answered(doc, template, client.post(url, content=bomb, headers={"content-encoding": "gzip"}))
    assert r.status_code == 413 and "larger than the limit of 65536 bytes" in r.json()["error"], r.text
    assert client.get(f"/v2/models/{NAME}/ready").status_code == 200  # an unload refused unloaded nothing


# --- 12. each route's descriptions are true of it -------------------------------------------------------------

def _said(doc: dict, method: str, template: str, status: str) -> str:
    return operation(doc, method, template)["responses"][status]["description"]


def test_each_route_describes_its_own_errors(doc):
    v1_400 = _said(doc, "POST", CLASSIFY, "400")
    assert "v2" not in v1_400 and "classification" not in v1_400
    for template in (INFER, VERSIONED_INFER):
        assert _said(doc, "POST", template, "422") == "Outputs that are not finite for this input"
        assert "classification" in _said(doc, "POST", template, "400")
        assert "top_k" not in json.dumps(operation(doc, "POST", template)["responses"])
    assert "top_k" in _said(doc, "POST", CLASSIFY, "422") and "multipart" in _said(doc, "POST", CLASSIFY, "422")
    assert "version" not in _said(doc, "POST", INFER, "404") and "version" in _said(doc, "POST", VERSIONED_INFER, "404")
    for plain, versioned in zip(MODEL_ROUTES, VERSIONED_ROUTES, strict=True):
        assert "version" not in _said(doc, "GET", plain, "404") and "version" in _said(doc, "GET", versioned, "404")
    assert "Queue" not in _said(doc, "POST", INDEX, "503") and "thread" in _said(doc, "POST", LOAD, "503")
    assert "failed" in _said(doc, "GET", "/v2/health/ready", "400")
    assert "failed" in operation(doc, "GET", "/v2/health/ready")["summary"]
    assert "failed" not in _said(doc, "GET", "/v2/models/{name}/ready", "400")


def test_a_failed_load_is_the_documented_not_ready(repo, client, doc):
    """Strict readiness: a model whose last load failed holds the server not ready, every loaded model serving."""
    (repo / "empty").mkdir()
    try:
        r = answered(doc, LOAD, client.post("/v2/repository/models/empty/load"))
        assert r.status_code == 400 and "version" in r.json()["error"], r.text
        assert client.get(f"/v2/models/{NAME}/ready").status_code == 200
        r = answered(doc, "/v2/health/ready", client.get("/v2/health/ready"))
        assert (r.status_code, r.json()) == (400, {"ready": False})
    finally:
        assert client.post("/v2/repository/models/empty/unload").status_code == 200
        (repo / "empty").rmdir()
    assert client.get("/v2/health/ready").status_code == 200


@pytest.mark.parametrize("name", [".hidden", "-dash", "x" * 129])
def test_a_name_no_model_can_have_is_refused_as_one(client, doc, name):
    """The unload's documented 400 (not its success for a name the server does not know), and a load's, say why."""
    from serve.registry import NAME_RULE

    for template in (LOAD, UNLOAD):
        r = answered(doc, template, client.post(template.format(name=name)))
        assert r.status_code == 400 and r.json()["error"] == f"{name!r} is not a model name: {NAME_RULE}", r.text
    assert answered(doc, UNLOAD, client.post(UNLOAD.format(name="not_known"))).json() == {}


def test_a_repository_body_that_is_not_json_says_why(client):
    r = client.post("/v2/repository/index", content=b'{"ready": tru}')
    assert r.status_code == 400 and "the index request body must be a JSON object" in r.json()["error"]
    assert "not valid JSON" in r.json()["error"]
