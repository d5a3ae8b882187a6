"""Request validation: every bad input is refused with a message that says what to fix."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from service.labels import LABEL_INDEX, LABELS, NUM_LABELS
from service.lco import LCOOptions
from service.schemas import MAX_SEED, GenerateRequest, resolve_labels


def refused(body: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate(body)
    assert fragment in str(info.value), str(info.value)


def test_labels_as_mapping_list_aliases_and_exclusive():
    spec = resolve_labels({"pleural effusion": True, "MASS": False}, exclusive=False)
    assert spec.constraints == {"Effusion": True, "Mass": False}
    assert spec.description == "Effusion -Mass"
    listed = resolve_labels(["Effusion", "Infiltrate"], exclusive=True)
    assert listed.mask.sum() == NUM_LABELS
    assert set(listed.positives) == {"Effusion", "Infiltration"}
    assert listed.description == "Effusion+Infiltration only"


def test_no_finding_means_every_label_absent():
    for spec in (resolve_labels(["No Finding"], False), resolve_labels({}, True), resolve_labels({"normal": True}, False)):
        assert spec.mask.sum() == NUM_LABELS and spec.target.sum() == 0
        assert spec.description == "No Finding"
    free = resolve_labels({}, False)
    assert free.mask.sum() == 0 and free.description == "unconditional"


def test_label_vectors_follow_the_vocabulary_order():
    spec = resolve_labels({"Hernia": True, "Edema": False}, False)
    expected_mask = np.zeros(NUM_LABELS, np.float32)
    expected_mask[[LABEL_INDEX["Hernia"], LABEL_INDEX["Edema"]]] = 1
    assert np.array_equal(spec.mask, expected_mask)
    assert spec.target[LABEL_INDEX["Hernia"]] == 1 and spec.target.sum() == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"labels": {"Pneumonitis": True}}, "valid labels are: " + ", ".join(LABELS)),
        ({"labels": {"Effusion": True, "pleural effusion": False}}, "both present and absent"),
        ({"labels": ["No Finding", "Mass"]}, '"No Finding" cannot be combined with present findings (Mass)'),
        ({"labels": {"No Finding": False}}, "name the findings you want present"),
        ({"labels": {"Effusion": "yes"}}, "valid boolean"),
        ({"labels": "Effusion"}, "labels"),
        ({"count": 0}, "count must be between 1 and"),
        ({"count": 10_000_000}, "count must be between 1 and"),
        ({"count": "3"}, "valid integer"),
        ({"count": 2.5}, "valid integer"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"seed": MAX_SEED + 1}, f"less than or equal to {MAX_SEED}"),
        ({"format": "jpeg"}, "'png8' or 'png16'"),
        ({"destination": "https://bucket/x"}, "is not an S3 URI"),
        ({"destination": "s3://Bad_Bucket/x"}, "not a valid bucket name"),
        ({"destination": "s3://bucket/a/../b"}, "'..' segment"),
        ({"destination": "s3://bucket/a\nb"}, "control characters"),
        ({"lco": {"steps": 5000}}, "less than or equal to 1000"),
        ({"lco": {"lr": 0}}, "greater than or equal to 0.0001"),
        ({"lco": {"candidates": 0}}, "greater than or equal to 1"),
        ({"lco": {"truncation": 9}}, "less than or equal to 4"),
        ({"lco": {"momentum": 0.9}}, "unknown LCO option(s) momentum; valid: steps"),
        ({"retries": 1000}, "retries must be at most"),
        ({"cnt": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_say_what_to_fix(body, fragment):
    refused(body, fragment)


def test_malformed_json_is_a_validation_error():
    with pytest.raises(ValidationError, match="Invalid JSON"):
        GenerateRequest.model_validate_json(b'{"labels": {"Effusion": true,')


def test_valid_request_and_lco_overrides():
    request = GenerateRequest.model_validate_json(
        b'{"labels": {"Effusion": true}, "count": 3, "seed": 7, "format": "png16", '
        b'"destination": "s3://my-bucket/runs/a", "strict": true, "lco": {"steps": 50, "candidates": 4}}'
    )
    options = request.lco
    assert (options.steps, options.candidates, options.lr) == (50, 4, LCOOptions().lr)
    assert request.label_spec().constraints == {"Effusion": True}
