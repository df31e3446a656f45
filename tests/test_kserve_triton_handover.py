"""Handing a repository to KServe and Triton, what tester hCU found: the default storage URI carries the repository
directory's name as it is (KServe never percent-decodes a pvc:// path: it is the volume's subPath, taken literally),
and, what tester hCX found, an untouched file holding an earlier version's encoded default gets it too, with a note;
a pvc:// path may hold spaces and non-ASCII letters; inferenceservice.yaml writes non-ASCII characters as UTF-8,
not as JSON's UTF-16 surrogate escapes that YAML (and kubectl) refuse; a version directory Triton reads by its leading
digits ("5.bak" is version 5 to Triton, which then opens "5/") is refused at a repository load (400) and at the
server's start, as export.triton refuses to write beside it; and --triton-version refuses the NGC images that hold
no tritonserver (-sdk, -min)."""

from __future__ import annotations

import shutil
import urllib.parse
from pathlib import Path

import pytest
import yaml
from test_repository_lifecycle import CONFIG, NAME, add_version, client, served
from test_serve_fixtures import micro_bundle
from test_triton_handover import _refused, _tree

from export import kserve, triton
from serve.errors import ServeError
from serve.registry import load_models

ONNX_MODEL = "micro-onnx-fp32"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory, ("onnx",))


def _isvc(repo: Path) -> dict:
    """inferenceservice.yaml as YAML reads it, from its bytes decoded as UTF-8 (what kubectl reads)."""
    return yaml.safe_load((repo / triton.ISVC_FILE).read_bytes().decode("utf-8"))


def _storage_uri(repo: Path) -> str:
    return _isvc(repo)["spec"]["predictor"]["model"]["storageUri"]


def _write_old_isvc(repo: Path, **given: str) -> None:
    """repo's inferenceservice.yaml as the previous version of this tool wrote it, untouched (its hash line holds)."""
    values = {"name": "vitc-micro", "storage_uri": "s3://b/repo", "runtime_version": "24.05-py3", "gpus": 0, **given}
    (repo / triton.ISVC_FILE).write_bytes(kserve.inference_service(kserve.Service(**values)).encode())


# --- 1. the default storage URI is the directory's name, as KServe reads a pvc:// path ---------------------------


@pytest.mark.parametrize("dirname", ["my models", "Modèles_V2", "100%", "plain"])
def test_the_default_storage_uri_carries_the_repository_directory_name_as_it_is(bundle, tmp_path, dirname):
    """It was `pvc://vitc-models/my%20models`: KServe splits a pvc:// URI on "/" and mounts the rest as the volume's
    subPath, so the pod looked for a directory literally named `my%20models`."""
    repo = tmp_path / dirname
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert _storage_uri(repo) == f"pvc://vitc-models/{dirname}"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # a new version keeps it, as it was read back
    assert (repo / ONNX_MODEL / "2").is_dir() and _storage_uri(repo) == f"pvc://vitc-models/{dirname}"


@pytest.mark.parametrize("uri", ["pvc://claim/my models/Modèles V2", "pvc://claim/ leading and trailing "])
def test_a_pvc_path_may_hold_spaces_and_non_ascii_letters(bundle, tmp_path, uri):
    """A Kubernetes subPath is a path like any other: a space in a directory name is valid there."""
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--storage-uri", uri]) == 0
    assert _storage_uri(repo) == uri
    kserve.check_storage_uri(uri)


@pytest.mark.parametrize("uri", ["pvc://my claim/repo", "s3://b/my models", "gs://b/x\ty", "pvc://claim/x\ny",
                                 "pvc://claim/a\u200bb", "pvc://claim/a\x7fb"])
def test_spaces_stay_refused_outside_a_pvc_path_and_control_characters_everywhere(uri):
    with pytest.raises(kserve.RepositoryError, match=r"without whitespace \(but for spaces in a pvc:// path\) or "
                                                     "control characters"):
        kserve.check_storage_uri(uri)


def test_a_given_storage_uri_is_written_as_given_never_re_encoded(bundle, tmp_path):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--storage-uri", "pvc://claim/my%20models"]) == 0
    assert _storage_uri(repo) == "pvc://claim/my%20models"


def _write_earlier_default(repo: Path) -> str:
    """repo's inferenceservice.yaml as vitc before ae4f6cc wrote it by default: the directory's name percent-encoded
    (`urllib.parse.quote(name, safe="")`). Byte for byte what 9aacfd3's export.triton writes (checked against a run
    of it from a git worktree): the file format is unchanged, only the default URI is. Returns that URI."""
    uri = f"pvc://vitc-models/{urllib.parse.quote(repo.resolve().name, safe='')}"
    _write_old_isvc(repo, storage_uri=uri)
    assert kserve.is_marked((repo / triton.ISVC_FILE).read_text(), kserve._ISVC_MARK)  # untouched
    return uri


@pytest.mark.parametrize("dirname", ["my models", "100%", "Modèles_V2"])
def test_an_encoded_default_an_earlier_version_wrote_is_replaced_with_a_note(bundle, tmp_path, capsys, dirname):
    """KServe mounts a pvc:// path as it is, so `pvc://vitc-models/my%20models` names a directory that does not exist
    and Triton starts on an empty repository: re-exporting with this version rewrites it, and says so."""
    repo = tmp_path / dirname
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    encoded = _write_earlier_default(repo)
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert (repo / ONNX_MODEL / "2").is_dir() and _storage_uri(repo) == f"pvc://vitc-models/{dirname}"
    notes = [line for line in out.splitlines() if encoded in line]
    assert len(notes) == 1 and notes[0].startswith("note: "), out
    assert f"pvc://vitc-models/{dirname}" in notes[0] and "KServe decodes no % escape" in notes[0], notes
    isvc = _isvc(repo)  # the rest of the file as it was
    assert isvc["metadata"]["name"] == "vitc-micro"
    assert isvc["spec"]["predictor"]["model"]["runtimeVersion"] == "24.05-py3"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # once: the new default is read back as it is
    assert encoded not in capsys.readouterr().out and _storage_uri(repo) == f"pvc://vitc-models/{dirname}"


def test_an_edited_file_holding_the_encoded_default_keeps_it(bundle, tmp_path, capsys):
    """An edited file is the user's: its URI may be the directory they created on the volume."""
    repo = tmp_path / "my models"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    encoded = _write_earlier_default(repo)
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text() + "# our PVC holds my%20models\n")
    edited = path.read_bytes()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert path.read_bytes() == edited and "KServe decodes" not in capsys.readouterr().out
    assert triton.main([str(bundle), "--out", str(repo), "--replace-isvc"]) == 0  # regenerated, its URI kept
    assert _storage_uri(repo) == encoded and "KServe decodes" not in capsys.readouterr().out


def test_a_given_storage_uri_replaces_the_encoded_default_without_a_note(bundle, tmp_path, capsys):
    repo = tmp_path / "my models"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    _write_earlier_default(repo)
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo), "--storage-uri", "pvc://vitc-models/my%20models"]) == 0
    assert _storage_uri(repo) == "pvc://vitc-models/my%20models" and "KServe decodes" not in capsys.readouterr().out


@pytest.mark.parametrize(("dirname", "uri"), [("my models", "pvc://other-claim/my%20models"),
                                              ("my models", "pvc://vitc-models/their%20models"),
                                              ("my models", "pvc://vitc-models/my%2520models"),
                                              ("my models", "s3://b/my%20models"),
                                              ("plain", "pvc://vitc-models/plain")])
def test_a_stored_uri_other_than_the_encoded_default_is_kept(bundle, tmp_path, capsys, dirname, uri):
    """Only the exact URI the earlier default made is vitc's own mistake; any other was chosen by someone."""
    repo = tmp_path / dirname
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    _write_old_isvc(repo, storage_uri=uri)
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert _storage_uri(repo) == uri and "KServe decodes" not in capsys.readouterr().out


def test_an_encoded_default_of_a_name_no_storage_uri_can_carry_asks_for_storage_uri(bundle, tmp_path, capsys):
    """`tab%09here` names another directory too, and the name itself cannot be a storage URI: refused, as a new
    repository of that name is, with nothing written."""
    repo = tmp_path / "tab\there"
    repo.mkdir()
    encoded = _write_earlier_default(repo)
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo)], capsys)
    assert encoded in err and "KServe decodes no % escape" in err and "pass --storage-uri" in err, err
    assert _tree(repo) == before
    assert triton.main([str(bundle), "--out", str(repo), "--storage-uri", "s3://b/repo"]) == 0


@pytest.mark.parametrize("dirname", ["tab\there", "zero\u200bwidth"])
def test_a_directory_name_no_storage_uri_can_carry_asks_for_storage_uri(bundle, tmp_path, capsys, dirname):
    """It used to be percent-encoded into a path KServe reads literally; now the run is refused, nothing written."""
    err = _refused([str(bundle), "--out", str(tmp_path / dirname)], capsys)
    assert "the default storage URI" in err and "pass --storage-uri" in err, err
    assert not (tmp_path / dirname).exists()
    assert triton.main([str(bundle), "--out", str(tmp_path / dirname), "--storage-uri", "s3://b/repo"]) == 0


# --- 2. non-ASCII storage URIs are written as UTF-8, which YAML reads back exactly ---------------------------------


@pytest.mark.parametrize("uri", ["s3://my-bucket/models-😀/repo", "gs://bucket/Modèles/repo",
                                 "pvc://vitc-models/my models"])
def test_the_storage_uri_reads_back_exactly_from_the_yaml(bundle, tmp_path, uri):
    """An emoji was written as the JSON surrogate pair \\ud83d\\ude00, which go-yaml (kubectl) refuses and PyYAML
    reads as two lone surrogates, not the URI given."""
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo), "--storage-uri", uri]) == 0
    raw = (repo / triton.ISVC_FILE).read_bytes()
    assert f'storageUri: "{uri}"'.encode() in raw and b"\\u" not in raw  # raw UTF-8, no escape of any kind
    assert _storage_uri(repo) == uri
    assert triton.main([str(bundle), "--out", str(repo)]) == 0  # read back by the next export, regenerated alike
    assert (repo / ONNX_MODEL / "2").is_dir() and _storage_uri(repo) == uri
    assert (repo / triton.ISVC_FILE).read_bytes() == raw


def test_a_file_an_earlier_version_wrote_with_escapes_reads_back_and_is_rewritten_as_utf8(bundle, tmp_path):
    repo = tmp_path / "repo"
    uri = "s3://my-bucket/models-😀/repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    text = kserve.inference_service(kserve.Service("vitc-micro", "s3://b/x", "24.05-py3", 0))
    old = text.partition("\n")[2].replace('"s3://b/x"', '"s3://my-bucket/models-\\ud83d\\ude00/repo"')
    (repo / triton.ISVC_FILE).write_text(kserve.marked(old, kserve._ISVC_MARK))  # untouched, as that version wrote it
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert _storage_uri(repo) == uri and b"\\u" not in (repo / triton.ISVC_FILE).read_bytes()


# --- 3. version directories Triton reads by their leading digits ---------------------------------------------------


@pytest.mark.parametrize(("odd", "version"), [("5.bak", 5), ("5-old", 5), ("2_backup", 2), ("+7", 7), (" 3", 3)])
def test_a_version_directory_triton_reads_by_its_leading_digits_is_refused_at_load(fake, repo, odd, version):
    """vitc served version 1 of such a model; Triton reads `5.bak` as version 5 (std::stoll), the newest, opens
    `5/`, which does not exist, and the model fails to load (tritonserver exits at start on KServe)."""
    with client(served(repo)) as c:
        shutil.copytree(repo / NAME / "1", repo / NAME / odd)  # a backup an operator made
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400, r.text
        assert (f"version directory {odd!r} is read by Triton as version {version} (it parses the leading digits), "
                f"and '{version}/' does not exist: rename or remove it") in r.json()["error"], r.text
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the version loaded before serves on
        shutil.rmtree(repo / NAME / odd)
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200


def test_a_backup_beside_the_version_it_copies_loads_that_version(fake, repo):
    """Triton reads "5.bak" as version 5 too, but counts version 5 once and opens "5/": the model loads, and vitc
    serves "5/" as Triton does (an operator's backup beside its version is harmless)."""
    add_version(repo, NAME, "5")
    with client(served(repo)) as c:
        shutil.copytree(repo / NAME / "5", repo / NAME / "5.bak")
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 200, r.text
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["5"]


@pytest.mark.parametrize(("policy", "status"), [("", 200), ("version_policy: { all { } }\n", 400),
                                                ("version_policy: { specific { versions: [3] } }\n", 400)])
def test_a_misread_version_is_refused_only_where_the_policy_loads_it(fake, repo, policy, status):
    """"3.bak" is version 3 to Triton: under latest 1 with a "7/" Triton loads 7 and never opens "3/", so the model
    loads; under `all` or `specific [3]` Triton opens the missing "3/" and fails, so vitc refuses it too."""
    add_version(repo, NAME, "7")
    with client(served(repo)) as c:
        shutil.copytree(repo / NAME / "1", repo / NAME / "3.bak")
        (repo / NAME / "config.pbtxt").write_text(CONFIG + policy)
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == status, r.text
        if status == 200:
            assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["7"]
        else:
            assert "version directory '3.bak' is read by Triton as version 3" in r.json()["error"], r.text


def test_the_server_does_not_start_on_such_a_model_and_says_why_in_one_line(fake, repo, capsys):
    from serve.__main__ import main

    shutil.copytree(repo / NAME / "1", repo / NAME / "3.bak")
    with pytest.raises(ServeError, match="version directory '3.bak' is read by Triton as version 3"):
        load_models(served(repo))
    assert main(["--model-repository", str(repo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m serve: error: model '{NAME}={repo / NAME}': version directory '3.bak' is read "
                          "by Triton as version 3") and err.count("\n") == 1, err


@pytest.mark.parametrize("odd", ["05.bak", "007", "backup-5", ".5", "v5", "warmup", "initial_state", "²"])
def test_names_triton_skips_stay_ignored(fake, repo, odd):
    shutil.copytree(repo / NAME / "1", repo / NAME / odd)
    assert load_models(served(repo))[NAME].version == "1"
    with client(served(repo)) as c:
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]


def test_a_file_named_like_a_version_is_no_directory_to_triton(fake, repo):
    (repo / NAME / "5.bak").write_text("notes")  # Triton lists subdirectories only
    assert load_models(served(repo))[NAME].version == "1"


def test_export_triton_refuses_to_add_a_version_beside_such_a_directory_saying_how_triton_reads_it(
        bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    shutil.copytree(repo / ONNX_MODEL / "1", repo / ONNX_MODEL / "5.bak")
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo)], capsys)
    assert f"{ONNX_MODEL}/ is not a model directory of this tool (it holds '5.bak', which Triton reads as version 5" \
        in err, err
    assert _tree(repo) == before


def test_export_triton_still_writes_beside_another_model_holding_such_a_directory(bundle, tmp_path, capsys):
    """Nothing this run writes changes that model (as a kept engine Triton cannot load, which it notes, not refuses)."""
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    other = repo / "other"
    shutil.copytree(repo / ONNX_MODEL, other)
    shutil.copytree(other / "1", other / "3.bak")
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    assert (repo / ONNX_MODEL / "2").is_dir()


# --- 4. Triton images without tritonserver -------------------------------------------------------------------------


@pytest.mark.parametrize(("tag", "what"), [("24.06-py3-sdk", "client SDK"), ("24.06-py3-min", "base image"),
                                           ("24.06-py3-igpu-sdk", "client SDK"),
                                           ("24.06-py3-igpu-min", "base image")])
def test_a_triton_image_without_tritonserver_is_refused(bundle, tmp_path, capsys, tag, what):
    with pytest.raises(kserve.RepositoryError) as refused:
        kserve.triton_tag(tag)
    assert what in str(refused.value) and "holds no tritonserver" in str(refused.value)
    err = _refused([str(bundle), "--out", str(tmp_path / "repo"), "--triton-version", tag], capsys)
    assert f"--triton-version {tag}" in err and "holds no tritonserver" in err and "use 24.06-py3" in err, err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(("tag", "written"), [("24.06", "24.06-py3"), ("24.06-py3", "24.06-py3"),
                                              ("24.06-py3-igpu", "24.06-py3-igpu")])
def test_server_images_stay_accepted(tag, written):
    assert kserve.triton_tag(tag) == written


def test_a_kept_file_that_runs_an_image_without_tritonserver_is_not_silently_replaced(bundle, tmp_path, capsys):
    """The previous version wrote what it was given; a later export neither keeps that nor swaps in another release
    without a word: it asks for --triton-version."""
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    _write_old_isvc(repo, runtime_version="24.06-py3-sdk")
    before = _tree(repo)
    err = _refused([str(bundle), "--out", str(repo)], capsys)
    assert "24.06-py3-sdk" in err and "holds no tritonserver" in err and "--triton-version" in err, err
    assert _tree(repo) == before
    assert triton.main([str(bundle), "--out", str(repo), "--triton-version", "24.06"]) == 0
    assert _isvc(repo)["spec"]["predictor"]["model"]["runtimeVersion"] == "24.06-py3"


def test_an_edited_file_that_runs_an_image_without_tritonserver_is_kept_with_the_reason(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    path = repo / triton.ISVC_FILE
    path.write_text(path.read_text().replace('"24.05-py3"', '"24.06-py3-min"') + "# edited\n")
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    assert f"kept {path}" in out and "24.06-py3-min" in out and "holds no tritonserver" in out, out
