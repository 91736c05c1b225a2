"""The protocol table (studyapp.protocols): answers, keys, slots and known answers."""

from __future__ import annotations

import pytest

from studyapp.models import Study
from studyapp.protocols import (
    MAX_ANSWER_LENGTH,
    BadResponse,
    correct_answer,
    image_paths,
    label_set_problem,
    trial_spec,
    validate_response,
)


def study(**fields) -> Study:
    return Study(slug="s", title="t", **fields)


def test_jnd_is_todays_protocol():
    spec = trial_spec(study())
    assert spec.answers == ("same", "different")
    assert spec.keys == {"f": "same", "j": "different"}
    assert spec.phases == ("first_ms", "blank_ms", "second_ms") and spec.n_images == 2
    assert validate_response(study(), "same") == "same"
    with pytest.raises(BadResponse, match="'left' is not an answer of this jnd study"):
        validate_response(study(), "left")


def test_2afc_sides_follow_natural_first():
    assert image_paths("2afc", 3, True, "ref", "a", "b") == ("ref", "a", "b")
    assert image_paths("2afc", 3, False, "ref", "a", "b") == ("ref", "b", "a")
    s = study(protocol="2afc")
    # A equals the reference: the side showing A is the answer.
    assert correct_answer(s, is_sentinel=True, natural_first=True, natural_path="ref",
                          other_path="ref", third_path="b") == "left"
    assert correct_answer(s, is_sentinel=True, natural_first=False, natural_path="ref",
                          other_path="ref", third_path="b") == "right"
    assert correct_answer(s, is_sentinel=False, natural_first=True, natural_path="ref",
                          other_path="a", third_path="b") is None
    with pytest.raises(BadResponse):
        validate_response(s, "same")


def test_rating_scale_and_modes():
    s = study(protocol="rating", rating_points=7)
    spec = trial_spec(s)
    assert spec.answers == tuple("1234567") and spec.keys["7"] == "7"
    assert spec.n_images == 2
    assert correct_answer(s, is_sentinel=True, natural_first=True, natural_path="x",
                          other_path="x") == "1"
    single = study(protocol="rating", rating_shows="single")
    assert trial_spec(single).n_images == 1 and trial_spec(single).phases == ("first_ms",)
    assert image_paths("rating", 1, True, "nat", "adv") == ("adv",)
    with pytest.raises(BadResponse, match="'8' is not an answer"):
        validate_response(s, "8")


def test_label_answers_are_the_label_set():
    s = study(protocol="label", label_set=["cat", "dog", "ship"])
    assert trial_spec(s).keys == {"1": "cat", "2": "dog", "3": "ship"}
    assert validate_response(s, "dog") == "dog"
    with pytest.raises(BadResponse, match="'Dog' is not an answer of this label study"):
        validate_response(s, "Dog")
    assert correct_answer(s, is_sentinel=True, natural_first=True, natural_path="x",
                          other_path="x", class_name="ship") == "ship"


@pytest.mark.parametrize("labels, problem", [
    (["cat", "dog"], None),
    ([], "the label set is empty"),
    ("cat,dog", "a label set is a list of class names"),
    (["cat", ""], "entry '' is not a class name"),
    (["cat", " dog"], "entry ' dog' is not a class name"),
    (["cat", 3], "entry 3 is not a class name"),
    (["cat", "d" * 201], "longer than 200 characters (a judgment's response holds 200)"),
    (["cat", "d\x00g"], "contains a NUL character"),
    (["cat", "dog", "cat"], "given twice in the label set: cat"),
])
def test_a_label_set_must_be_answerable(labels, problem):
    """Every label must be a response the participant API accepts (Judgment.response holds
    200 characters; NUL characters are refused), once each; Study.clean says which is not."""
    from django.core.exceptions import ValidationError

    from studyapp.models import Judgment

    assert MAX_ANSWER_LENGTH == Judgment._meta.get_field("response").max_length
    found = label_set_problem(labels)
    if problem is None:
        assert found is None
        study(protocol="label", label_set=labels).clean()
        return
    assert problem in found
    with pytest.raises(ValidationError, match="label_set"):
        study(protocol="label", label_set=labels).clean()
