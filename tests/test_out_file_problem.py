"""The output-file checks `serve.sample`, `serve.tensor` and `train.eval` share (`models.io.out_file_problem`): one
order, each command's own error type and wording, nothing created by the checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.io import out_file_problem, same_file
from serve import sample, tensor
from train import eval as train_eval

HARM = "it would be lost"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_new_file_passes_and_nothing_is_created(tmp_path):
    before = _tree(tmp_path)
    assert out_file_problem(tmp_path / "x.bin", "x.bin") is None
    assert out_file_problem(str(tmp_path / "new" / "x.bin"), "x.bin", inside=(tmp_path / "data", "the data", HARM),
                            existing=lambda _p: "never asked", links=False) is None
    assert _tree(tmp_path) == before


def test_each_refusal_in_order(tmp_path):
    (data := tmp_path / "data").mkdir()
    (folder := tmp_path / "dir.bin").mkdir()
    (taken := tmp_path / "taken.bin").write_text("someone's")
    os.symlink(folder, link := tmp_path / "link.bin")
    long = tmp_path / ("n" * 300 + ".bin")
    assert out_file_problem(long, "x.bin").startswith("--out: the name 'nnnnnnnn")
    # The name comes first, then the folder the output must stay out of, then the directory, then what is there.
    assert out_file_problem(data / ("n" * 300), "x.bin", inside=(data, "the data", HARM)).startswith("--out: the name")
    inside = out_file_problem(data, "x.bin", inside=(data, "the data", HARM))
    assert inside == f"--out {data} lies inside the data {data.resolve()}: {HARM}"
    assert out_file_problem(folder, "x.bin") == (f"--out {folder} is a directory; give a file name such as "
                                                 f"{folder / 'x.bin'}")
    assert out_file_problem(folder, "eval.json", noun="file path").endswith(f"give a file path such as "
                                                                          f"{folder / 'eval.json'}")
    assert out_file_problem(taken, "x.bin") is None  # no policy: replaced
    seen: list[Path] = []
    assert out_file_problem(str(taken), "x.bin", existing=lambda p: seen.append(p) or "kept") == "kept"
    assert seen == [taken]
    # A link to a directory is a directory, unless links are refused: then it is the link that is refused first.
    assert "is a directory" in out_file_problem(link, "x.bin")
    assert out_file_problem(link, "x.bin", links=False) == (f"--out {link} is a symbolic link; give the path of the "
                                                            "file itself")
    os.symlink(link.parent / "nowhere", dangling := tmp_path / "dangling.bin")
    assert out_file_problem(dangling, "x.bin", existing=lambda _p: "there") == "there"  # lexists: the link is there


def test_a_path_that_cannot_be_looked_at_is_one_line(tmp_path, monkeypatch):
    def denied(self: Path) -> bool:  # a directory on the way that cannot be searched (root could search it)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", denied)
    assert out_file_problem(tmp_path / "x.bin", "x.bin") == f"--out {tmp_path / 'x.bin'}: Permission denied"
    with pytest.raises(sample.SampleError, match=r"x\.png: Permission denied$"):
        sample.check_out(str(tmp_path / "x.png"), "animals")


def test_same_file_takes_paths_and_descriptors(tmp_path):
    (a := tmp_path / "a").write_text("x")
    os.link(a, hard := tmp_path / "hard")
    os.symlink(a, soft := tmp_path / "soft")
    (b := tmp_path / "b").write_text("x")
    assert same_file(a, hard) and same_file(str(soft), a) and same_file(tmp_path / "." / "a", a)
    assert not same_file(a, b) and not same_file(a, tmp_path / "missing") and not same_file(tmp_path / "missing", a)
    fd = os.open(a, os.O_RDONLY)
    try:
        assert same_file(fd, hard) and not same_file(fd, b)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ each command keeps its wording
def test_sample_keeps_its_messages(tmp_path):
    def refused(out: Path | str, dataset: str = "animals") -> str:
        with pytest.raises(sample.SampleError) as info:
            sample.check_out(str(out), dataset)
        return str(info.value)

    assert refused(tmp_path) == f"--out {tmp_path} is a directory; give a file name such as {tmp_path / 'sample.png'}"
    assert refused(tmp_path / "x.gif") == f"--out {str(tmp_path / 'x.gif')!r} must end in .png, .jpg, .jpeg, .webp " \
                                          "(the image format to write)"
    assert refused(tmp_path / ("n" * 300 + ".png")).startswith("--out: the name")
    (folder := tmp_path / "photos").mkdir()
    harm = "the image would become part of the data; choose a path outside it"
    assert refused(folder / "x.png", str(folder)) == f"--out {folder / 'x.png'} lies inside the dataset folder " \
                                                      f"{folder.resolve()}: {harm}"
    # The folder itself is refused as inside it: "a directory, give such as <folder>/sample.png" pointed into it.
    assert "lies inside the dataset folder" in refused(folder, str(folder))
    (tmp_path / "old.png").write_text("kept")
    # As serve.tensor: an existing file is replaced only with --overwrite.
    assert refused(tmp_path / "old.png") == (f"--out {tmp_path / 'old.png'} already exists; nothing was changed: "
                                             "pass --overwrite to replace it, or give a new path")
    sample.check_out(str(tmp_path / "old.png"), "animals", overwrite=True)
    sample.check_out(str(tmp_path / "animals" / "x.png"), "animals")  # an embedded set has no folder


def test_tensor_keeps_its_messages(tmp_path):
    (bundle := tmp_path / "bundle").mkdir()
    (image := tmp_path / "img.npy").write_bytes(b"an image named like an output")

    def refused(out: Path, *, overwrite: bool = False) -> str:
        with pytest.raises(tensor.TensorError) as info:
            tensor.check_out(str(out), str(bundle), [str(image)], overwrite=overwrite)
        return str(info.value)

    assert "must end in .bin, .npy, .json" in refused(tmp_path / ("n" * 300 + ".txt"))  # the suffix comes first
    assert refused(tmp_path / ("n" * 300 + ".bin")).startswith("--out: the name")
    assert refused(bundle / "x.bin") == (f"--out {bundle / 'x.bin'} lies inside the bundle {bundle.resolve()}: the "
                                         "model's own files would be replaced; give a path outside it")
    (folder := tmp_path / "d.json").mkdir()
    assert refused(folder) == f"--out {folder} is a directory; give a file name such as {folder / 'x.json'}"
    assert refused(image, overwrite=True) == f"--out {image} is the input image {image}; give another path"
    (taken := tmp_path / "x.bin").write_text("someone's")
    assert refused(taken) == (f"--out {taken} already exists; nothing was changed: pass --overwrite to replace it, "
                              "or give a new path")
    tensor.check_out(str(taken), str(bundle), [str(image)], overwrite=True)
    tensor.check_out(str(tmp_path / "new.bin"), str(bundle), [str(image)])


def test_eval_keeps_its_messages(tmp_path):
    def refused(out: Path, dataset: str | None = None) -> str:
        with pytest.raises(train_eval.OutputRefused) as info:
            train_eval.check_out(out, dataset)
        return str(info.value)

    (folder := tmp_path / "d").mkdir()
    assert refused(folder) == f"--out {folder} is a directory; give a file path such as {folder / 'eval.json'}"
    os.symlink(folder, link := tmp_path / "link.json")
    assert refused(link) == f"--out {link} is a symbolic link; give the path of the file itself"
    (a_file := tmp_path / "file").write_text("x")
    assert refused(a_file / "sub" / "e.json") == f"--out {a_file / 'sub' / 'e.json'}: {a_file} is not a directory"
    (other := tmp_path / "other.json").write_text("{}")
    assert refused(other) == (f"--out {other} exists and is not a result of python -m train.eval; nothing was "
                              "changed: give a new path")
    (data := tmp_path / "data").mkdir()
    assert "lies inside the dataset folder" in refused(data / "e.json", str(data))
    assert refused(tmp_path / ("n" * 300 + ".json")).startswith("--out: the name")
    (ours := tmp_path / "ours.json").write_text('{"format": "vitc-eval"}')
    train_eval.check_out(ours)  # an earlier result of the tool is replaced
    train_eval.check_out(tmp_path / "new" / "e.json", "animals")
