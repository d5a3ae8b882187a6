"""A scripted reader: answers a study over HTTP as the reading page does, from a fixed plan.

It never looks at the images: its calls are a seeded coin, so its accuracy says nothing about realism.
It exists for the tests and the worked example in docs/reader-study.md, whose numbers are labelled as
coming from it; it is not a substitute for radiologists.
"""

from __future__ import annotations

import json
import urllib.request
import zlib

import numpy as np

from service.labels import LABELS


def scripted_answer(reader: str, number: int, ask_findings: bool = True) -> dict:
    """The answer the scripted ``reader`` gives to its case ``number`` (1-based): call, confidence 1-5
    and, when asked, 0-2 findings; a function of (reader, number) alone."""
    rng = np.random.default_rng([zlib.crc32(reader.encode()), number])
    answer = {"call": str(rng.choice(["real", "synthetic"])), "confidence": int(rng.integers(1, 6))}
    if ask_findings:
        answer["findings"] = sorted(str(f) for f in rng.choice(LABELS, size=int(rng.integers(0, 3)), replace=False))
    return answer


def _request(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def read_study(reader_url: str, reader: str) -> list[dict]:
    """Answer every remaining case behind ``reader_url`` (a reader's link); the answers given, in order."""
    given = []
    while True:
        state = _request(f"{reader_url}/state")
        if state["case"] is None:
            return given
        with urllib.request.urlopen(f"{reader_url}/cases/{state['case']['key']}/image", timeout=30) as response:
            response.read()
        answer = scripted_answer(reader, state["case"]["number"], state["ask_findings"])
        _request(f"{reader_url}/cases/{state['case']['key']}/answer", answer)
        given.append(answer | {"number": state["case"]["number"]})
