"""Nothing but the pixels tells a served real image from a synthetic one: the set-up command stores both
classes through one encoding, and over HTTP their bytes' length, headers, PNG structure, ids, positions
and response times are the same or random, so a classifier on them does no better than chance.

Synthetic images come from a bundle (the trained ``ci`` bundle, through LCO) or from a directory in the
archive layout (images/ and Data_Entry.csv; here phantoms written by ``training.phantoms``, which
writes that layout, so the archive path needs no trained model)."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, mannwhitneyu
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.bundle import read_manifest
from study.app import create_app, serve_in_thread
from study.cli import main
from study.storage import Assignment, Case, Study, session_factory
from tests.study_support import NIH_SAMPLE

FETCHES = 3


def png_chunks(data: bytes) -> list[tuple[str, bytes]]:
    """(type, payload) for IHDR and every ancillary chunk; IDAT payloads are left out (pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        payload = data[offset + 8:offset + 8 + length]
        chunks.append((kind.decode(), payload if kind != b"IDAT" else b""))
        offset += 12 + length
    return chunks


def fetch(url: str) -> tuple[bytes, dict[str, str], float]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        headers = {k.lower(): v for k, v in response.headers.items() if k.lower() != "date"}
    return body, headers, time.perf_counter() - start


@pytest.fixture
def phantom_archive(tmp_path) -> Path:
    from training.phantoms import write_dataset

    write_dataset(tmp_path / "archive", count=10, size=32, seed=4, workers=1, progress=False)
    return tmp_path / "archive"


@pytest.mark.parametrize("source", ["bundle", "archive"])
def test_served_images_carry_no_sign_of_their_class_but_the_pixels(tmp_path, source, request, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    links_file = tmp_path / "links.json"
    if source == "bundle":
        bundle = request.getfixturevalue("ci_bundle")
        synthetic = ["--synthetic", f"bundle:{bundle}", "--lco", '{"steps": 5}']
        side = read_manifest(bundle).resolution
    else:
        synthetic = ["--synthetic", f"archive:{request.getfixturevalue('phantom_archive')}"]
        side = 32
    status = main(["create", "--db", url, "--name", "blind", "--real", f"nih:{NIH_SAMPLE}", *synthetic,
                   "--cases", "16", "--readers", "r1,r2", "--seed", "3", "--base-url", "http://example.invalid",
                   "--links", str(links_file)])
    assert status == 0, capsys.readouterr().err
    links = json.loads(links_file.read_text())
    assert set(links) == {"admin", "r1", "r2"}
    with session_factory(url)() as session:
        study = session.query(Study).filter_by(name="blind").one()
        assert json.loads(study.setup)["cases"] == {"real": 8, "synthetic": 8}
        sources = {c.origin: c.source for c in study.cases}
        assert sources["synthetic"].startswith(source)
        rows = [(a.reader.name, a.key, a.position, a.case.origin)
                for a in session.query(Assignment).join(Case).filter(Case.study_id == study.id)]

    samples = []
    with serve_in_thread(create_app(url)) as base:
        for reader, key, position, origin in rows:
            reader_url = links[reader].replace("http://example.invalid", base)
            fetched = [fetch(f"{reader_url}/cases/{key}/image") for _ in range(FETCHES)]
            body, headers, _ = fetched[0]
            assert all(f[0] == body for f in fetched)
            samples.append({"origin": origin, "length": len(body), "headers": headers, "chunks": png_chunks(body),
                            "key": key, "position": position, "times": [f[2] for f in fetched]})

    # Everything that is not random is identical across both classes.
    for field in ("length", "headers", "chunks"):
        assert len({json.dumps(s[field], default=repr, sort_keys=True) for s in samples}) == 1, field
    chunk_types = [kind for kind, _ in samples[0]["chunks"]]
    assert chunk_types[0] == "IHDR" and chunk_types[-1] == "IEND" and set(chunk_types) == {"IHDR", "IDAT", "IEND"}
    width, height, depth, colour = struct.unpack(">IIBB", samples[0]["chunks"][0][1][:10])
    assert (width, height, depth, colour) == (side, side, 8, 0)  # the synthetic images' side, 8-bit grey
    assert samples[0]["headers"]["content-type"] == "image/png"

    # What is random (ids, positions, timings) does not separate them either.
    def features(sample: dict) -> list[float]:
        key_bytes = sample["key"].encode()
        return [sample["length"], len(sample["headers"]), sample["position"], int.from_bytes(key_bytes[:6], "big"),
                sum(key_bytes) % 97, float(np.median(sample["times"])), sample["times"][0], min(sample["times"])]

    x = np.array([features(s) for s in samples])
    y = np.array([s["origin"] == "synthetic" for s in samples])
    assert y.sum() == 16 and len(y) == 32
    predicted = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression()), x, y, cv=LeaveOneOut())
    correct = int((predicted == y).sum())
    assert binomtest(correct, len(y), 0.5, alternative="greater").pvalue > 0.001, f"{correct}/{len(y)} right"
    timing = [np.median(s["times"]) for s in samples]
    assert mannwhitneyu([t for t, s in zip(timing, y) if s], [t for t, s in zip(timing, y) if not s]).pvalue > 0.001


def test_set_up_errors_are_one_line_and_store_nothing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["create", "--db", url, "--name", "bad", "--readers", "a", "--seed", "0"]
    cases = [
        (["--real", f"nih:{NIH_SAMPLE}", "--synthetic", "folder:/nowhere", "--cases", "4"], "write one of archive:PATH"),
        (["--real", f"nih:{NIH_SAMPLE}", "--synthetic", f"bundle:{tmp_path}", "--cases", "4"], "cannot read the bundle"),
        (["--real", "phantoms:10", "--synthetic", f"archive:{tmp_path}", "--cases", "4"], "no images/*.png"),
        (["--real", f"nih:{NIH_SAMPLE}", "--synthetic", f"bundle:{tmp_path}", "--cases", "1"], "at least 2 cases"),
    ]
    for extra, words in cases:
        assert main(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m study: error:") and words in err and "\n" not in err, err
    assert main(["report", "--db", url, "--name", "missing", "--out", str(tmp_path / "out")]) == 2
    assert "no study named 'missing'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--db", url, "--port", str(taken.getsockname()[1])]) == 2
        assert "already in use" in capsys.readouterr().err
    with session_factory(url)() as session:
        assert session.query(Study).count() == 0
