"""The paper study's runtime measurement (train.sweep.runtime) and `make gpu-check` take the device names of
models.device within its bound, as the runtimes and the server's settings do: a device the server would refuse
(cuda:100, cuda:999) is refused when the command line is read, one line naming the flag, the value and the rule."""

from __future__ import annotations

import pytest

from models.device import DEVICE_RULE


def _main(module: str):
    if module == "runtime":
        from train.sweep.runtime import main
    else:
        from benchmarks.gpu_check import main
    return main


@pytest.mark.parametrize("module", ["runtime", "gpu_check"])
@pytest.mark.parametrize("device", ["cuda:100", "cuda:999", "cuda:1x", "gpu"])
def test_a_device_beyond_the_rule_is_refused_in_one_line_naming_it(module, device, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _main(module)(["--device", device, "--out", str(tmp_path / "o")] if module == "gpu_check"
                      else ["--device", device])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"error: argument --device: must be {DEVICE_RULE}, got {device!r}"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:99"])
def test_the_names_within_the_rule_get_past_the_parser(device):
    from models.cli import device_arg  # the --device type of train.sweep and benchmarks.gpu_check

    assert device_arg(device) == device
