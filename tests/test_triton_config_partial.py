"""A config.pbtxt that does not declare the model's input and output (emptied, or cut short at a line end by a
half-finished copy or a full disk) is refused, as Triton run with --disable-auto-complete-config refuses it: a
repository load answers 400 with the reason and the version served before serves on, the start exits 2 with one
line, and export.triton does not keep such a file for a new version. It used to load with the input and output
filled in from the manifest, without its dynamic batching and label file, and an empty file served otherwise than an
absent one. A hand-edited file that declares them still loads, with or without export.triton's hash line."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_repository_lifecycle import CONFIG, NAME, add_version
from test_serve_fixtures import micro_bundle

from export import triton
from serve.errors import ServeError
from serve.registry import load_models
from serve.settings import Settings

SAYS = "Triton run with --disable-auto-complete-config, as the InferenceService runs it, refuses a config"
# The first line export.triton writes; the hash below is not the rest's: the file was edited (or cut short) since.
MARK = "# written by python -m export.triton (edit freely: an edited file is kept); sha256 of the rest: "


@contextlib.contextmanager
def client(repo: Path) -> Iterator[httpx.Client]:
    from fastapi.testclient import TestClient

    from serve.app import create_app

    with TestClient(create_app(Settings(model_control_mode="explicit",
                                        model_repository=repo, access_log=False, graceful_timeout_s=5))) as c:
        yield c


def cut_short(text: str) -> list[tuple[str, str]]:
    """(text, what the refusal says) for every cut at a line end that loses the input or the output, and an empty
    and a blank file."""
    lines = text.splitlines(keepends=True)
    empty = "config.pbtxt: is empty (a half-finished copy or a full disk?)"
    out = [("", empty), ("\n  \n", empty)]
    for n in range(1, len(lines)):
        head = "".join(lines[:n])
        if "\noutput [" in "\n" + head:
            break
        says = "declares no output" if "\ninput [" in "\n" + head else "declares no input and no output"
        out.append((head, f"config.pbtxt: {says} (cut short by a half-finished copy or a full disk?)"))
    return out


def infer(c: httpx.Client) -> httpx.Response:
    x = np.zeros((1, 3, 32, 32), np.float32)
    return c.post(f"/v2/models/{NAME}/infer", json={"inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})


def test_a_config_without_its_input_and_output_is_refused_and_the_old_version_serves_on(fake, repo):
    config = repo / NAME / "config.pbtxt"
    marked = MARK + hashlib.sha256(CONFIG.encode()).hexdigest() + "\n" + CONFIG
    cases = cut_short(CONFIG) + cut_short(marked)
    assert len(cases) == 2 * 2 + 4 + 5  # empty, blank, and the cuts before `output` without and with the hash line
    with client(repo) as c:
        add_version(repo, NAME, "2")  # a new version arrives with the broken config: version 1 serves on
        for text, says in cases:
            config.write_text(text)
            r = c.post(f"/v2/repository/models/{NAME}/load")
            assert r.status_code == 400, (text, r.text)
            error = r.json()["error"]
            assert says in error and SAYS in error and "\n" not in error, (text, error)
            assert c.get(f"/v2/models/{NAME}/ready").status_code == 200
            assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]
            served = c.get(f"/v2/models/{NAME}/config").json()
            assert served["dynamic_batching"]["max_queue_delay_microseconds"] == 500
            assert infer(c).status_code == 200
        # Edited by hand (export.triton's hash line no longer matches) and still declaring them: loads, as written.
        config.write_text(MARK + "0" * 64 + "\n" + CONFIG.replace("max_queue_delay_microseconds: 500",
                                                                   "max_queue_delay_microseconds: 700"))
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 200, r.text
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["2"]
        assert c.get(f"/v2/models/{NAME}/config").json()["dynamic_batching"]["max_queue_delay_microseconds"] == 700
        assert infer(c).status_code == 200


@pytest.mark.parametrize("text", ["", CONFIG.split("input [")[0]])
def test_the_server_does_not_start_on_such_a_config_and_says_why_in_one_line(fake, repo, capsys, text):
    from serve.__main__ import main

    config = repo / NAME / "config.pbtxt"
    config.write_text(text)
    with pytest.raises(ServeError, match="config.pbtxt: (is empty|declares no input and no output)"):
        load_models(Settings(model_repository=repo))
    assert main(["--model-repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m serve: error: model '{NAME}={repo / NAME}': {config}: ") and SAYS in err, err
    assert err.count("\n") == 1
    config.unlink()  # no config.pbtxt at all: vitc's defaults, as before
    assert load_models(Settings(model_repository=repo))[NAME].version == "1"


def test_what_export_triton_writes_loads_and_a_cut_copy_of_it_is_refused_and_not_kept(tmp_path_factory, tmp_path,
                                                                                       capsys):
    bundle = micro_bundle(tmp_path_factory)
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    name = "micro-onnx-fp32"
    config = repo / name / "config.pbtxt"
    generated = config.read_text()
    with client(repo) as c:
        for model in (d.name for d in repo.iterdir() if d.is_dir()):  # every generated config loads
            assert c.post(f"/v2/repository/models/{model}/load").status_code == 200, model
        cases = cut_short(generated)
        assert len(cases) >= 5  # the hash line, name, backend, max_batch_size, dynamic_batching, input
        for text, says in cases:
            config.write_text(text)
            r = c.post(f"/v2/repository/models/{name}/load")
            assert r.status_code == 400 and says in r.json()["error"], (text, r.text)
            assert c.get(f"/v2/models/{name}/ready").status_code == 200
    # A new version does not keep such a file (a repository that neither vitc nor Triton would load): exit 2.
    before = sorted(p.name for p in (repo / name).iterdir())
    config.write_text(generated.split("output [")[0])
    with pytest.raises(SystemExit) as refused:
        triton.main([str(bundle), "--out", str(repo)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "declares no output" in err and "--replace-config" in err, err
    assert sorted(p.name for p in (repo / name).iterdir()) == before
    assert triton.main([str(bundle), "--out", str(repo), "--replace-config"]) == 0
    assert config.read_text() == generated
