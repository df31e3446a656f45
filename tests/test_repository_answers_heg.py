"""What the repository API tells a client it cannot serve (hEG): an index request whose `ready` (or a load's
`parameters`) has the wrong type names the field and the type expected, not only "must be a JSON object"; a load of
an unknown name lists, as known, what the index lists (bounded), not only the models served so far."""

from __future__ import annotations

import shutil

import pytest
from test_repository_lifecycle import NAME, client, fake, repo, served  # noqa: F401 - fixtures


@pytest.mark.parametrize(("body", "says"), [
    (b'{"ready": "yes"}', '"ready" must be a boolean (true or false), not the string "yes"'),
    (b'{"ready": 1}', '"ready" must be a boolean (true or false), not the number 1'),
    (b'{"ready": null}', '"ready" must be a boolean (true or false), not null'),
    (b'{"ready": [true]}', '"ready" must be a boolean (true or false), not an array'),
    (b"[]", 'the index request body must be a JSON object like {"ready": true}, not an array'),
    (b'"x"', 'the index request body must be a JSON object like {"ready": true}, not the string "x"'),
])
def test_an_index_body_of_the_wrong_type_is_told_which_field_and_type(fake, repo, body, says):  # noqa: F811
    with client(served(repo)) as c:
        r = c.post("/v2/repository/index", content=body)
        assert r.status_code == 400 and r.json()["error"].endswith(says), r.text


def test_load_parameters_of_the_wrong_type_are_told_so(fake, repo):  # noqa: F811
    with client(served(repo)) as c:
        r = c.post(f"/v2/repository/models/{NAME}/load", json={"parameters": []})
        assert (r.status_code, r.json()["error"]) == (400, 'the request\'s "parameters" must be a JSON object, not '
                                                           "an array")
        r = c.post(f"/v2/repository/models/{NAME}/load", json=7)
        assert r.status_code == 400 and r.json()["error"].endswith(", not the number 7")


def test_a_load_of_an_unknown_name_lists_what_the_index_lists_bounded(fake, repo):  # noqa: F811
    with client(served(repo)) as c:
        shutil.copytree(repo / NAME, repo / "bad")  # its config.pbtxt names "fake": its load fails
        assert c.post("/v2/repository/models/bad/load").status_code == 400
        r = c.post("/v2/repository/models/zzz/load")
        assert (r.status_code, r.json()["error"]) == (400, "no model 'zzz' in the repository; known: bad, fake")
        for i in range(25):
            (repo / f"m{i:02}").mkdir()  # copied in after the start: listed, never loaded
        listed = sorted({e["name"] for e in c.post("/v2/repository/index").json()})
        assert len(listed) == 27 and "bad" in listed
        r = c.post("/v2/repository/models/zzz/load")
        assert r.json()["error"] == (f"no model 'zzz' in the repository; known: {', '.join(listed[:20])} and 7 more "
                                     "(POST /v2/repository/index lists them)")
