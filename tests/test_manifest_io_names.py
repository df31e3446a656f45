"""The input and output tensor names live on the Manifest, the one place every stage reads them from: the load spec
and the served model no longer forward them (nor the sample shape, which is `manifest.input.sample_shape`)."""

from __future__ import annotations

import dataclasses

from test_serve_fixtures import LEGACY

from models.bundle import Manifest, read_manifest
from runtimes.base import LoadSpec
from serve.registry import ServedModel


def test_the_manifest_names_its_input_and_output():
    m = read_manifest(LEGACY)
    assert (m.input_name, m.output_name) == (m.input.name, m.output.name) == ("input", "logits")
    renamed = dataclasses.replace(m, input=dataclasses.replace(m.input, name="pixels"),
                                  output=dataclasses.replace(m.output, name="scores"))
    assert (renamed.input_name, renamed.output_name) == ("pixels", "scores")


def test_no_forwarders_are_left():
    for cls in (LoadSpec, ServedModel):
        for name in ("input_name", "output_name", "sample_shape"):
            assert not hasattr(cls, name), f"{cls.__name__}.{name} forwards the manifest again"
    assert isinstance(Manifest.input_name, property) and isinstance(Manifest.output_name, property)
