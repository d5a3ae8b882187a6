"""Request validation: every bad input is refused with a message that says what to fix."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from openapi_schema_validator import OAS30Validator
from pydantic import ValidationError

from service.counterfactual import DEFAULT_IMAGE_PULL, DEFAULT_PULL
from service.labels import LABEL_INDEX, LABELS, NO_FINDING, NUM_LABELS
from service.lco import LCOOptions
from service.schemas import MAX_SEED, S3_URI_PATTERN, EditRequest, GenerateRequest, resolve_labels, settings
from tests.openapi_requests import inline_refs, invalid_instance, valid_instance


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
        ({"format": "jpeg"}, "'png8', 'png16' or 'dicom'"),
        ({"destination": "https://bucket/x"}, "is not an S3 URI"),
        ({"destination": "s3://Bad_Bucket/x"}, "not a valid bucket name"),
        ({"destination": "s3://bucket/a/../b"}, "'..' segment"),
        ({"destination": "s3://bucket/a\nb"}, "control characters"),
        ({"destination": "s3://bucket\n/a"}, "not a valid bucket name"),
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


# -- the schema the OpenAPI document publishes ------------------------------------------------------
def request_schema() -> dict:
    schema = GenerateRequest.model_json_schema()
    return inline_refs({key: value for key, value in schema.items() if key != "$defs"}, schema)


def test_the_destination_pattern_accepts_exactly_what_the_service_accepts():
    """Random strings near the S3 URI grammar: the published pattern (searched, as JSON Schema does)
    matches a string exactly when the request validator takes it."""
    rng = random.Random(7)
    pieces = ["s3://", "bucket", "my.bucket", "a", "-", ".", "..", "/", "//", "x", "Bad", "\\", "\n", "\x7f",
              "é", " ", "runs", "2025"]
    seen = {True: 0, False: 0}
    for _ in range(4000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.8:
            text = "s3://" + text
        try:
            GenerateRequest(destination=text)
            accepted = True
        except ValidationError:
            accepted = False
        assert bool(re.search(S3_URI_PATTERN, text)) == accepted, repr(text)
        seen[accepted] += 1
    assert min(seen.values()) > 200, seen  # both sides of the boundary were really tried


def test_the_published_schema_states_the_vocabulary_and_the_bounds():
    schema = request_schema()
    properties = schema["properties"]
    label_forms = properties["labels"]["oneOf"]
    assert set(label_forms[0]["properties"]) == set(LABELS)
    assert label_forms[0]["additionalProperties"] is False
    assert label_forms[1]["properties"][NO_FINDING] == {"type": "boolean", "enum": [True]}
    assert label_forms[2]["items"]["enum"] == list(LABELS)
    assert (properties["count"]["minimum"], properties["count"]["maximum"]) == (1, settings().max_count)
    assert properties["retries"]["maximum"] == settings().max_retries
    assert (properties["seed"]["maximum"], properties["seed"]["nullable"]) == (MAX_SEED, True)
    assert properties["destination"]["pattern"] == S3_URI_PATTERN
    lco = properties["lco"]["properties"]
    assert (lco["steps"]["minimum"], lco["steps"]["maximum"], lco["steps"]["default"]) == (0, 1000, 200)
    assert (lco["truncation"]["minimum"], lco["truncation"]["nullable"]) == (0.5, True)
    assert schema["additionalProperties"] is False


def test_requests_drawn_from_the_schema_are_accepted_and_broken_ones_refused():
    """Schema-valid ⇒ accepted, one rule broken ⇒ a validation error: the schema says what the
    validators do. The OpenAPI 3.0 validator checks the drawn requests are what they claim to be."""
    schema = request_schema()
    validator = OAS30Validator(schema)
    rng = random.Random(11)
    for _ in range(300):
        body = valid_instance(schema, rng)
        assert validator.is_valid(body), body
        GenerateRequest.model_validate_json(json.dumps(body))
        broken, where = invalid_instance(schema, rng)
        assert not validator.is_valid(broken), (where, broken)
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate_json(json.dumps(broken))


@pytest.mark.parametrize(("weights", "fragment"), [
    ({"image_proximity": -1.0}, "image_proximity"),
    ({"image_proximity": 1e9}, "image_proximity"),
    ({"proximity": -0.5}, "proximity"),
])
def test_edit_proximity_weights_out_of_bounds_are_refused(weights, fragment):
    body = {"reference": {"model_version": "20261201.000000-0000000", "seed": 1, "labels": {"Effusion": False}},
            "change": {"add": ["Effusion"]}, **weights}
    with pytest.raises(ValidationError) as info:
        EditRequest.model_validate(body)
    message = str(info.value)
    assert fragment in message and ("greater than or equal" in message or "less than or equal" in message), message
    default = EditRequest.model_validate({key: value for key, value in body.items() if key not in weights})
    assert (default.proximity, default.image_proximity) == (DEFAULT_PULL, DEFAULT_IMAGE_PULL)
