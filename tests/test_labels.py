import numpy as np
import pytest

from service.labels import (
    LABELS,
    NO_FINDING,
    UnknownLabelError,
    format_finding_labels,
    labels_to_vector,
    parse_finding_labels,
    parse_label,
)


def test_vocabulary_is_nih_spelling():
    assert len(LABELS) == 14
    assert "Pleural_Thickening" in LABELS and "Infiltration" in LABELS
    assert list(LABELS) == sorted(LABELS)


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("effusion", "Effusion"),
        ("Pleural Effusion", "Effusion"),
        ("pleural thickening", "Pleural_Thickening"),
        ("PLEURAL_THICKENING", "Pleural_Thickening"),
        ("Infiltrate", "Infiltration"),
        ("  cardiomegaly ", "Cardiomegaly"),
        ("no finding", NO_FINDING),
    ],
)
def test_aliases_and_case(alias, canonical):
    assert parse_label(alias) == canonical


@pytest.mark.parametrize("bad", ["Pneumonitis", "", 3, None])
def test_unknown_label_lists_valid_names(bad):
    with pytest.raises(UnknownLabelError) as info:
        parse_label(bad)
    message = str(info.value)
    assert all(name in message for name in LABELS) and NO_FINDING in message


def test_finding_labels_round_trip():
    vector = parse_finding_labels("Mass|Effusion")
    assert vector.dtype == np.float32 and vector.sum() == 2
    assert format_finding_labels(vector) == "Effusion|Mass"
    assert format_finding_labels(labels_to_vector([NO_FINDING])) == NO_FINDING
