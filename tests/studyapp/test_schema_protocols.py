"""The OpenAPI schema of the judgment POST and the session state is true for every protocol.

Oracle: the ``jsonschema`` package (Draft 2020-12) on the published schema's components, with
OpenAPI 3.0's ``nullable: true`` read as "or null" and ``#/components/schemas`` references
resolved (:func:`json_schema`); and the server itself (what it stores, what it refuses). For
each protocol (jnd, 2afc, rating pairs, single-image rating, label):

- the session state validates against ``SessionState`` and names the answers and phases;
- a valid body built from that state validates against ``JudgmentInputRequest``, is stored
  (201) and the stored judgment validates against ``Judgment``;
- bodies the schema accepts but the session's protocol does not (another protocol's answer,
  a phase too many or too few) are 400s whose bodies validate against ``Error``, name the
  field, and write nothing.

JND clients keep their contract: every body generated from the schema as it was before
protocols (frozen below) validates against today's schema, and the only changes to the
request's validation keywords are the three relaxations a protocol needs.
"""

from __future__ import annotations

import copy
import json
import uuid
from functools import cache

import pytest
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, given, settings
from jsonschema import Draft202012Validator
from protocol_items import VARIANTS, make_protocol_study
from rest_framework.test import APIClient

from studyapp.models import Judgment, Participant
from studyapp.scheduler import start_session

PROTOCOLS = ["jnd", *VARIANTS]  # jnd, 2afc, rating, rating-single, label
JND_PHASES = ["first_ms", "blank_ms", "second_ms"]


@cache
def openapi() -> dict:
    """The published schema (as ``GET /api/schema/?format=json`` renders it)."""
    generated = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(generated))


def _to_json_schema(node):
    """OpenAPI 3.0 schema object → JSON Schema 2020-12 (nullable → "or null"; refs → $defs)."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref":
            out[key] = value.replace("#/components/schemas/", "#/$defs/")
        elif key in ("properties", "$defs"):
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key != "nullable":
            out[key] = _to_json_schema(value)
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def json_schema(component: str, old: bool = False) -> Draft202012Validator:
    """A validator for ``#/components/schemas/<component>`` of the published schema (``old``:
    of :data:`OLD_REQUEST_COMPONENTS`, the request schema before protocols)."""
    components = OLD_REQUEST_COMPONENTS if old else openapi()["components"]["schemas"]
    document = {
        "$defs": {name: _to_json_schema(sub) for name, sub in components.items()},
        "$ref": f"#/$defs/{component}",
    }
    Draft202012Validator.check_schema(document)
    return Draft202012Validator(document)


def errors_of(validator: Draft202012Validator, instance) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(instance)]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def protocol_session(make_study, media_root):
    """``protocol_session(variant)`` → a started session of a study of that protocol."""

    def make(variant: str):
        if variant == "jnd":
            study = make_study(slug="s-jnd")
        else:
            study = make_protocol_study(media_root, variant, slug=f"s-{variant}")
        participant = Participant.objects.create(study=study, external_id=str(uuid.uuid4()))
        return start_session(participant)

    return make


def _state(token: str) -> dict:
    response = APIClient().get(f"/api/sessions/{token}/")
    assert response.status_code == 200, response.content
    return response.json()


def _answers_and_phases(state: dict) -> tuple[list[str], list[str]]:
    """What the state tells a client to send (no protocol block: JND)."""
    protocol = state["study"].get("protocol")
    if protocol is None:
        return ["same", "different"], JND_PHASES
    return protocol["answers"], protocol["phases"]


def _body(position: int, response: str, durations: dict, **extra) -> dict:
    return {
        "position": position, "response": response, "response_time_ms": 640.5,
        "durations": durations, "idempotency_key": str(uuid.uuid4()), **extra,
    }


def _post(token: str, body: dict):
    return APIClient().post(f"/api/sessions/{token}/judgments/", body, format="json")


MEASURED = {"first_ms": 500.25, "blank_ms": 249.5, "second_ms": 501.0}


# ------------------------------------------------------------------------------ every protocol


@pytest.mark.django_db
@pytest.mark.parametrize("variant", PROTOCOLS)
def test_each_protocols_valid_body_validates_against_the_schema_and_is_stored(
    variant, protocol_session
):
    session = protocol_session(variant)
    state = _state(session.token)
    assert not errors_of(json_schema("SessionState"), state)
    answers, phases = _answers_and_phases(state)
    expected = {
        "jnd": (["same", "different"], JND_PHASES),
        "2afc": (["left", "right"], ["first_ms"]),
        "rating": (["1", "2", "3", "4", "5"], JND_PHASES),
        "rating-single": (["1", "2", "3", "4", "5"], ["first_ms"]),
        "label": (["person", "cat", "cup", "ship"], ["first_ms"]),
    }[variant]
    assert (answers, phases) == expected
    request_schema = json_schema("JudgmentInputRequest")
    judgment_schema = json_schema("Judgment")
    positions = [t["position"] for t in state["trials"]]
    # Every answer of the protocol, with the phases the state names; one-phase protocols
    # both ways the description allows (other phases left out, or null).
    bodies = []
    for i, answer in enumerate(answers):
        durations = {phase: MEASURED[phase] for phase in phases}
        if len(phases) == 1 and i % 2:
            durations |= {"blank_ms": None, "second_ms": None}
        extra = {"display": {"scale": 2, "device_pixel_ratio": 2.0, "exact": True}} if i else {}
        bodies.append(_body(positions[i % len(positions)], answer, durations, **extra))
    for body in bodies:
        assert not errors_of(request_schema, body), body
    stored = []
    for body in bodies[: len(positions)]:  # one judgment per trial
        response = _post(session.token, body)
        assert response.status_code == 201, response.content
        assert not errors_of(judgment_schema, response.json()), response.json()
        stored.append(response.json())
    for judgment in stored:
        durations = judgment["durations"]
        assert durations["first_ms"] == MEASURED["first_ms"]
        for phase in ("blank_ms", "second_ms"):
            assert durations[phase] == (MEASURED[phase] if phase in phases else None)
    # The state after judging still validates (answered trials).
    assert not errors_of(json_schema("SessionState"), _state(session.token))


# Schema-valid bodies that each protocol refuses: (response, durations) and the field named.
def _refusals(variant: str) -> list[tuple[str, dict, str]]:
    one = {"first_ms": 400.0}
    three = dict(MEASURED)
    good = {"jnd": "same", "2afc": "left", "rating": "3", "rating-single": "3", "label": "cat"}
    two_phase = variant in ("jnd", "rating")
    right = three if two_phase else one
    wrong_answers = {
        "jnd": ["left", "3", "cat", "Same"],
        "2afc": ["same", "1", "cat", "left "],
        "rating": ["same", "right", "0", "6", "3.0"],
        "rating-single": ["different", "left", "6"],
        "label": ["left", "same", "1", "dog", "Cat"],
    }[variant]
    cases = [(answer, right, "response") for answer in wrong_answers]
    if two_phase:  # a phase too few
        cases += [(good[variant], {"first_ms": 400.0}, "durations"),
                  (good[variant], {**three, "second_ms": None}, "durations")]
    else:  # a phase too many
        cases += [(good[variant], three, "durations"),
                  (good[variant], {"first_ms": 400.0, "blank_ms": 0}, "durations")]
    return cases


@pytest.mark.django_db
@pytest.mark.parametrize("variant", PROTOCOLS)
def test_what_a_protocol_refuses_is_a_documented_400_and_writes_nothing(
    variant, protocol_session
):
    session = protocol_session(variant)
    position = _state(session.token)["trials"][0]["position"]
    request_schema, error_schema = json_schema("JudgmentInputRequest"), json_schema("Error")
    documented = openapi()["paths"]["/api/sessions/{token}/judgments/"]["post"]["responses"]
    assert documented["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    for answer, durations, field in _refusals(variant):
        body = _body(position, answer, durations)
        # The schema cannot know the session's protocol: these bodies are schema-valid ...
        assert not errors_of(request_schema, body), body
        response = _post(session.token, body)
        # ... and the server's refusal is the documented 400, in the documented shape.
        assert response.status_code == 400, (body, response.content)
        error = response.json()
        assert not errors_of(error_schema, error), error
        assert error["code"] == "invalid"
        assert error["error"].startswith(f"{field}." if field == "durations" else field), error
        assert set(error["fields"]) == {field}, error
        if field == "response":
            assert f"{answer!r} is not an answer of this" in error["error"]
    assert not Judgment.objects.filter(trial__session=session).exists()
    # Unknown position, unknown token: the documented 404, same shape.
    durations = MEASURED if variant in ("jnd", "rating") else {"first_ms": 400.0}
    good = {"jnd": "same", "2afc": "left", "rating": "3", "rating-single": "3", "label": "cat"}
    for token, at in ((session.token, 10_000), ("no-such-token", position)):
        response = _post(token, _body(at, good[variant], durations))
        assert response.status_code == 404, response.content
        assert not errors_of(error_schema, response.json())
    assert not Judgment.objects.filter(trial__session=session).exists()


# ------------------------------------------------------------------------------ JND contract

# The request schema as published before protocols (validation keywords only; descriptions
# left out): what a JND client generated from it.
OLD_REQUEST_COMPONENTS = {
    "SameDifferentEnum": {"enum": ["same", "different"], "type": "string"},
    "DisplayRequest": {
        "type": "object",
        "properties": {
            "scale": {"type": "integer", "maximum": 64, "minimum": 1},
            "device_pixel_ratio": {
                "type": "number", "format": "double", "maximum": 100, "minimum": 0.05,
            },
            "exact": {"type": "boolean", "nullable": True},
        },
        "required": ["device_pixel_ratio", "exact", "scale"],
    },
    "DurationsRequest": {
        "type": "object",
        "properties": {
            phase: {"type": "number", "format": "double", "maximum": 60000, "minimum": 0}
            for phase in JND_PHASES
        },
        "required": ["blank_ms", "first_ms", "second_ms"],
    },
    "JudgmentInputRequest": {
        "type": "object",
        "properties": {
            "position": {"type": "integer", "maximum": 2147483647, "minimum": 0},
            "response": {
                "allOf": [{"$ref": "#/components/schemas/SameDifferentEnum"}],
                "minLength": 1, "maxLength": 200,
            },
            "response_time_ms": {
                "type": "number", "format": "double", "maximum": 600000, "minimum": 0,
            },
            "durations": {"$ref": "#/components/schemas/DurationsRequest"},
            "display": {"$ref": "#/components/schemas/DisplayRequest"},
            "idempotency_key": {"type": "string", "minLength": 8, "maxLength": 64},
        },
        "required": ["durations", "idempotency_key", "position", "response", "response_time_ms"],
    },
}
ANNOTATIONS = {"description", "example", "title"}


def _keywords(node):
    """``node`` without its annotations (what validates is left)."""
    if isinstance(node, list):
        return [_keywords(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {
        key: ({k: _keywords(v) for k, v in value.items()} if key == "properties"
              else _keywords(value))
        for key, value in node.items() if key not in ANNOTATIONS
    }


def test_the_request_schema_changed_only_by_the_three_relaxations_protocols_need():
    components = openapi()["components"]["schemas"]
    now = {name: _keywords(components[name]) for name in OLD_REQUEST_COMPONENTS}
    expected = copy.deepcopy(OLD_REQUEST_COMPONENTS)
    # 1. response: any protocol's answer (a label set is any strings), not JND's enum only.
    expected["JudgmentInputRequest"]["properties"]["response"] = {
        "type": "string", "minLength": 1, "maxLength": 200,
    }
    # 2, 3. blank_ms and second_ms: optional and nullable (one-image protocols).
    durations = expected["DurationsRequest"]
    durations["required"] = ["first_ms"]
    for phase in ("blank_ms", "second_ms"):
        durations["properties"][phase]["nullable"] = True
    assert now == expected
    # The description says what each protocol accepts.
    description = components["JudgmentInputRequest"]["properties"]["response"]["description"]
    for words in ("`same`, `different`", "`left`", "`right`", "`1` … `N`", "label set",
                  "study.protocol.answers"):
        assert words in description
    blank = components["DurationsRequest"]["properties"]["blank_ms"]["description"]
    assert "Required (a number) for JND and rating-pair studies" in blank


OLD_DOCUMENT = {
    "openapi": "3.0.3",
    "info": {"title": "before protocols", "version": "0"},
    "paths": {
        "/judgments/": {
            "post": {
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/JudgmentInputRequest"}}},
                },
                "responses": {"201": {"description": "stored"}},
            }
        }
    },
    "components": {"schemas": OLD_REQUEST_COMPONENTS},
}


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=schemathesis.openapi.from_dict(OLD_DOCUMENT)["/judgments/"]["POST"].as_strategy())
def test_every_body_of_the_old_jnd_schema_validates_against_the_new_one(case):
    body = case.body
    # (the generator's own check: a body of the old schema)
    assert not errors_of(json_schema("JudgmentInputRequest", old=True), body)
    assert body["response"] in ("same", "different")
    assert not errors_of(json_schema("JudgmentInputRequest"), body), body


@pytest.mark.django_db
def test_jnd_bodies_of_the_runner_still_validate_and_jnd_refusals_are_unchanged(
    protocol_session, judgment_body
):
    request_schema = json_schema("JudgmentInputRequest")
    session = protocol_session("jnd")
    state = _state(session.token)
    assert "protocol" not in state["study"]  # a JND client sees no protocol block
    positions = [t["position"] for t in state["trials"]]
    bodies = [
        judgment_body(positions[0]),
        judgment_body(positions[1], response="same",
                      display={"scale": 1, "device_pixel_ratio": 1.25, "exact": None}),
        judgment_body(positions[2], durations={"first_ms": 0, "blank_ms": 0, "second_ms": 60000}),
    ]
    for body in bodies:
        assert not errors_of(request_schema, body), body
        assert _post(session.token, body).status_code == 201
    # What the old schema refused a JND client, the server still refuses for a JND session.
    for durations in ({"first_ms": 1.0}, {"first_ms": 1.0, "blank_ms": None, "second_ms": 2.0}):
        response = _post(session.token, judgment_body(positions[3], durations=durations))
        assert response.status_code == 400 and response.json()["error"].startswith("durations.")
    response = _post(session.token, judgment_body(positions[3], response="left"))
    assert response.status_code == 400
    assert response.json()["error"] == (
        "response: 'left' is not an answer of this jnd study; use one of 'same', 'different'"
    )
