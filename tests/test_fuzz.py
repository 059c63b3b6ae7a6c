"""The .dcz fuzzer: damaged and hostile files end in FormatError or an exact decode, within time and memory bounds."""
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from compress import fuzz
from compress.codec import container

CI_CASES = 3000  # ~5 s here; `python -m compress.fuzz --cases N` runs longer campaigns by hand


@pytest.fixture(scope="module")
def seeds():
    return [fuzz.seed_of(d) for d in fuzz.corpus()]


def test_fuzz_campaign_ends_in_refusal_or_exact_decode_within_bounds():
    summary = fuzz.campaign(CI_CASES, seed=0, isolate=False, time_cap=10.0)
    assert summary.ok, fuzz.report(summary, 0)
    assert summary.cases == CI_CASES and set(summary.outcomes) <= set(fuzz.PASSING)
    # the damage reaches deep: files that still decode (compared with the spec decoder) and refusals from
    # every layer of checks, behind the checksums as well as at them
    assert summary.outcomes["decoded"] >= CI_CASES // 100
    reached = set(summary.refused_fields)
    for field in ("footer.magic", "footer.table_crc", "payload_crc", "shape", "gap_stream", "gap_lengths",
                  "table.metadata", "header.version"):
        assert field in reached, (field, sorted(reached))
    assert summary.max_peak_ratio <= 1.0


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_hypothesis_damage_ends_in_refusal_or_exact_decode(seeds, data):
    base = data.draw(st.sampled_from(seeds))
    blob = bytearray(base.data)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["set", "cut", "field"]))
        if kind == "set" and blob:
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del blob[data.draw(st.integers(0, len(blob))):]
        else:
            f = data.draw(st.sampled_from([f for f in base.fields if f.fmt in ("I", "Q", "H", "B") or
                                           f.fmt.endswith("Q")]))
            width = 8 if "Q" in f.fmt else {"I": 4, "H": 2, "B": 1}[f.fmt]
            if f.offset + width <= len(blob):
                value = data.draw(st.sampled_from(fuzz.INTERESTING[width]) | st.integers(0, 2 ** (8 * width) - 1))
                blob[f.offset:f.offset + width] = value.to_bytes(width, "little")
    if data.draw(st.booleans()):
        fuzz.fix_checksums(blob, base)
    outcome = fuzz.run_case(bytes(blob), time_cap=10.0)
    assert outcome.kind in fuzz.PASSING, outcome


def test_fuzz_cases_replay_from_seed_and_index(seeds):
    assert fuzz.make_case(seeds, 7, 123) == fuzz.make_case(seeds, 7, 123)
    assert fuzz.make_case(seeds, 7, 123) != fuzz.make_case(seeds, 7, 124)


def test_fuzz_spec_decoder_reads_the_worked_example_of_the_format_doc():
    doc = (Path(__file__).parent.parent / "docs" / "FORMAT.md").read_text()
    dump = re.findall(r"^    [0-9a-f]{4}: ((?:[0-9a-f]{2} ?)+)$", doc, re.M)
    example = bytes.fromhex(" ".join(dump))
    assert len(example) == 168
    assert fuzz.spec_decode(example)["w"].tolist() == [[0, -0.5, 0.25, 0], [0, 0, 0, 0.25]]


def test_fuzz_spec_decoder_agrees_with_the_reader_on_every_corpus_file():
    for data in fuzz.corpus()[:-1]:  # the last is the bomb, refused by design
        reader = container.Reader(data)
        assert fuzz.differs({n: reader.array(n) for n in reader.names}, data) == ""


def test_fuzz_bomb_in_the_corpus_is_refused_before_allocating():
    outcome = fuzz.run_case(fuzz.corpus()[-1])
    assert outcome.kind == "refused" and outcome.detail == "shape" and outcome.peak < 1 << 20


def test_fuzz_a_wrong_decode_is_a_finding(monkeypatch, seeds):
    real = container.Reader.array

    def off_by_one_ulp(self, name):
        a = real(self, name)
        return np.nextafter(a, np.float32(np.inf)) if a.dtype == np.float32 else a

    monkeypatch.setattr(container.Reader, "array", off_by_one_ulp)
    outcome = fuzz.run_case(seeds[0].data)
    assert outcome.kind == "wrong" and "differs" in outcome.detail


def test_fuzz_worker_counts_crashes_hangs_and_memory_then_carries_on(monkeypatch):
    real = container.Reader.__init__

    def hostile(self, data, **kw):  # what a decoder bug could do, keyed on the first byte
        if data[:1] == b"K":
            os.kill(os.getpid(), signal.SIGSEGV)
        if data[:1] == b"H":
            while True:
                time.sleep(0.01)
        if data[:1] == b"M":
            bytearray(3 << 30)  # beyond the worker's address-space limit
        real(self, data, **kw)

    monkeypatch.setattr(container.Reader, "__init__", hostile)  # the forked worker inherits it
    worker = fuzz._Worker(time_cap=0.5, memory_mb=1024)
    try:
        assert worker.run(b"K").kind == "crash"
        assert worker.run(b"H").kind == "hang"
        assert worker.run(b"M").kind == "memory"
        assert worker.run(b"not a dcz file").kind == "refused"
    finally:
        worker.close()


def test_fuzz_command_line_reports_outcomes(tmp_path, capsys):
    out = tmp_path / "summary.json"
    assert fuzz.main(["--cases", "300", "--seed", "3", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["cases"] == 300
    assert sum(summary["outcomes"].values()) == 300
    assert "300 cases (seed 3)" in capsys.readouterr().out


def test_fuzz_command_line_refuses_a_bad_seed_file(tmp_path, capsys):
    bad = tmp_path / "x.dcz"
    bad.write_bytes(b"nope")
    assert fuzz.main(["--cases", "1", "--file", str(bad)]) == 2
    assert "x.dcz" in capsys.readouterr().err
