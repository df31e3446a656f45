"""The batching fields vitc reads from a Triton config.pbtxt: what export.triton writes reads back, the format's
comments, strings and nesting are understood, and what vitc cannot serve is refused with the reason."""

from __future__ import annotations

import pytest
from test_serve_fixtures import micro_bundle

from export import triton
from models.bundle import read_manifest
from serve import tritonconfig
from serve.tritonconfig import ConfigError, TritonBatching, parse


def test_what_export_triton_writes_reads_back(tmp_path_factory):
    bundle = micro_bundle(tmp_path_factory)
    m = read_manifest(bundle)
    text = triton.config_pbtxt("micro", m, m.servable()[0], kind="cpu", instances=2, max_queue_delay_us=750)
    assert parse(text) == TritonBatching(max_batch_size=m.input.max_batch, max_queue_delay_us=750)


def test_only_the_fields_at_their_place_count():
    text = """
    # max_batch_size: 99 in a comment
    name: "max_batch_size: 77"
    sequence_batching { max_queue_delay_microseconds: 5 }   # another batcher's field
    input [ { name: "x" dims: [ 3, 32, 32 ] }, { name: 'y' dims: [1] } ]
    max_batch_size : 16
    dynamic_batching < preferred_batch_size: [ 4, 8 ]; max_queue_delay_microseconds: 300 >
    version_policy: { latest: { num_versions: 1 } }
    """
    assert parse(text) == TritonBatching(max_batch_size=16, max_queue_delay_us=300)
    assert parse('name: "m"\nbackend: "onnxruntime"') == TritonBatching()


@pytest.mark.parametrize("text, says", [
    ("max_batch_size: 4\nmax_batch_size: 8", "given twice"),
    ("max_batch_size: -1", "non-negative integer"),
    ("max_batch_size: 1.5", "non-negative integer"),
    ("max_batch_size: 0", "not served by vitc"),
    ("dynamic_batching { max_queue_delay_microseconds: 99999999999 }", "at most"),
    ("dynamic_batching { max_batch_size: 4", "unclosed"),
    ("}", "unbalanced"),
    ("name: \"unterminated", "unexpected character"),
    ("{ }", "without a field name"),
    ("a {" * 40 + "}" * 40, "deeper than"),
])
def test_what_vitc_cannot_serve_is_refused_with_the_reason(text, says):
    with pytest.raises(ConfigError, match=says):
        parse(text)


def test_the_file_is_bounded_and_optional(tmp_path):
    assert tritonconfig.read(tmp_path) is None
    (tmp_path / "config.pbtxt").write_bytes(b"#" * (tritonconfig.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        tritonconfig.read(tmp_path)
    (tmp_path / "config.pbtxt").write_bytes(b"max_batch_size: 3 \xff")
    with pytest.raises(ConfigError, match="config.pbtxt"):
        tritonconfig.read(tmp_path)
