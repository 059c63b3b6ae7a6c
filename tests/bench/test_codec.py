import json
import math

import numpy as np
import pytest
import torch

from compress import bench, modelfile, models
from compress.bench import _synthetic
from compress.bench import codec
from compress.codec import container


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out, result = bench.run("codec", bench.Size.TINY, tmp_path_factory.mktemp("codec"))
    return out, result.figures


def test_codec_tiny_streams_sit_between_the_entropy_bound_and_one_bit_more_per_symbol(tiny_result):
    _, figures = tiny_result
    [model] = [f for name, f in figures.items() if name != "speed"]
    for row in model["streams"]:
        for stream in ("codes", "gaps"):
            s = row[stream]
            assert s["entropy_bits"] <= s["bits"] < s["entropy_bits"] + s["symbols"]  # Huffman's guarantee
    f = model["file"]
    assert f["stream_bound_bytes"] <= f["stream_bytes"] and f["file_over_bound"] >= 1
    assert f["file_bytes"] == f["stream_bytes"] + f["other_bytes"]
    assert f["table_bytes"] + f["raw_bytes"] < f["other_bytes"]  # headers and footer are the rest


def test_codec_tiny_compressors_and_kmeans_against_the_optimum(tiny_result):
    out, figures = tiny_result
    [model] = [f for name, f in figures.items() if name != "speed"]
    for form in ("pruned", "shared"):
        c = model["compressors"][form]
        assert 0 < c["zlib9"] < c["dense_bytes"] and 0 < c["lzma9"] < c["dense_bytes"]
    for row in model["kmeans"]:
        assert row["sse_optimal"] <= min(row["sse_linear"], row["sse_density"]) * (1 + 1e-9)
        assert row["sample"] == min(row["values"], codec.SAMPLE[bench.Size.TINY])
    speed = figures["speed"]
    assert speed["decode"]["runs"] == codec.REPEAT[bench.Size.TINY] and speed["decode_over_copy"] > 0
    record = json.loads((out / "result.json").read_text())
    assert record["benchmark"] == "codec" and "Whole file against the bound" in (out / "result.md").read_text()


def test_entropy_bits_worked_by_hand():
    assert codec.entropy_bits(np.array([0, 0, 1, 1])) == pytest.approx(4.0)
    assert codec.entropy_bits(np.array([5, 5, 5, 2])) == pytest.approx(3 * math.log2(4 / 3) + 2)
    assert codec.entropy_bits(np.array([7, 7, 7])) == 0.0


def test_synthetic_subject_file_decodes_to_the_shared_model(tmp_path):
    model = _synthetic.model(_synthetic.lenet300_shapes(), "s", density=0.2, bits=3)
    subject = codec.synthetic_subject(model, tmp_path)
    decoded = container.read(subject.path)
    for name, value in model.shared.items():
        assert np.array_equal(decoded[name].view(np.uint32), value.view(np.uint32))
        assert np.count_nonzero(model.pruned[name]) <= value.size
    assert all(2 ** b >= model.records[n].table.size for n, b in subject.bits.items())


def test_run_subject_reads_a_run_folder(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    state = net.state_dict()
    w = state["0.weight"].numpy()
    record = _synthetic.prune_share(w, 0.25, 2)
    pruned = dict(state)
    pruned["0.weight"] = torch.from_numpy(np.where(np.isin(np.arange(w.size), record.positions).reshape(w.shape),
                                                   w, 0).astype(np.float32))
    (tmp_path / "stages").mkdir()
    models.save_checkpoint({"model": pruned}, tmp_path / "stages" / "01-prune.pt")
    shared = dict(state, **{"0.weight": torch.from_numpy(record.to_dense())})
    modelfile.save(tmp_path / "model.dcz", shared, {"0.weight": record})
    subject = codec.run_subject(tmp_path)
    assert subject.bits == {"0.weight": max(1, math.ceil(math.log2(record.table.size)))}  # from the codebook
    entry = {"stage": "quantize", "figures": {"tensors": {"0.weight": {"bits": 2, "centroids": record.table.size}}}}
    models.save_checkpoint({"model": shared, "entry": json.dumps(entry)}, tmp_path / "stages" / "02-quantize.pt")
    subject = codec.run_subject(tmp_path)
    assert subject.bits == {"0.weight": 2}  # as the quantize stage asked
    np.testing.assert_array_equal(subject.kept["0.weight"], w.reshape(-1)[record.positions])
    assert set(subject.pruned) == set(state)
    rows = codec.stream_sizes(subject)
    assert [r["tensor"] for r in rows] == ["0.weight"] and rows[0]["kept"] == record.positions.size


def test_run_subject_without_its_files_is_an_input_error(tmp_path):
    from compress.errors import InputError

    with pytest.raises(InputError, match="model.dcz"):
        codec.run_subject(tmp_path)
