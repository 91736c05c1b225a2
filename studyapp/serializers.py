"""What the participant API reads and writes.

Nothing here names a condition, a bound, a pair or whether a trial is a sentinel: the trial
runner only ever sees positions and opaque per-trial image URLs (practice trials, which are
never analysed, also carry their correct answer for the feedback, where they have one).

Protocols (:mod:`studyapp.protocols`): a judgment's ``response`` and ``durations`` are checked
against the session's protocol (:class:`JudgmentInputSerializer` with ``context["spec"]``);
the session state of a study other than JND carries its trial spec (``study.protocol``).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .image_tokens import image_urls
from .models import Judgment, Session
from .protocols import (
    BadResponse,
    TrialSpec,
    check_answer,
    check_durations,
    correct_answer,
    trial_spec,
)

MAX_RESPONSE_TIME_MS = 10 * 60 * 1000
MAX_PHASE_MS = 60 * 1000
# Trial.position is a PositiveIntegerField: 0 … 2^31 − 1 on every backend. A larger position
# cannot name a trial; refused here (400) rather than overflowing the database's integer
# (SQLite raised OverflowError at ≥ 2^63: a 500).
MAX_POSITION = 2**31 - 1


class JSONNumberField(serializers.FloatField):
    """A finite JSON number; unlike DRF's FloatField, strings and booleans are refused."""

    default_error_messages = {"not_number": "Must be a number, not {kind}."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("not_number", kind=type(data).__name__)
        return super().to_internal_value(data)


class JSONIntegerField(serializers.IntegerField):
    """A JSON integer; strings, booleans and fractional numbers are refused."""

    default_error_messages = {"not_integer": "Must be an integer, not {kind}."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("not_integer", kind=type(data).__name__)
        return super().to_internal_value(data)


class JSONStringField(serializers.CharField):
    """A JSON string; numbers and booleans are refused (DRF's CharField would coerce them)."""

    default_error_messages = {"not_string": "Must be a string, not {kind}."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_string", kind=type(data).__name__)
        return super().to_internal_value(data)


class JSONBooleanField(serializers.BooleanField):
    """A JSON boolean; strings and numbers are refused (DRF's BooleanField would map "yes",
    1 ...)."""

    default_error_messages = {"not_boolean": "Must be a JSON boolean, not {kind}."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("not_boolean", kind=type(data).__name__)
        return data


# What the OpenAPI schema says of ``response``: what the server accepts across protocols, a
# non-empty string of at most 200 characters (minLength/maxLength come from the field), with
# each protocol's answers in words. Not an enum or a oneOf/anyOf of the protocols' answer sets:
# a label study's answers are its label set, any strings, so the union of every protocol's
# answers is "any string" and a union schema would validate nothing more while client
# generators turn it into wrapper types; a oneOf would even be false ("same" can be a label).
# The exact answers of one session are in its state (study.protocol.answers).
RESPONSE_DESCRIPTION = (
    "One of the answers of the session's protocol, exactly (case and spaces count). Each "
    "session's answers are in its state, GET /api/sessions/{token}/: "
    "`study.protocol.answers`; a JND study's state has no `study.protocol` and its answers "
    "are `same` and `different`. Per protocol: jnd `same`, `different`; 2afc `left`, "
    "`right`; rating `1` … `N` (decimal digits as a string; N = the study's rating points, "
    "2 to 11); label one class name of the study's label set. Any other string is a 400 "
    "(code `invalid`) naming the accepted answers (one with a NUL character: code "
    "`null_characters_not_allowed`)."
)


@extend_schema_field({"type": "string", "description": RESPONSE_DESCRIPTION, "example": "same"})
class ResponseField(JSONStringField):
    """A judgment's ``response``: a string, checked against the protocol by the serializer."""


def _ms(max_value: float, **kwargs) -> JSONNumberField:
    return JSONNumberField(min_value=0, max_value=max_value, **kwargs)


class DurationsSerializer(serializers.Serializer):
    """On-screen durations measured by the browser (differences of rAF timestamps), in ms.

    ``first_ms`` always; ``blank_ms`` and ``second_ms`` only for protocols with a second image
    (JND, rating pairs), where they are required; the others (2AFC, single-image rating,
    label) leave them out or send null. :class:`JudgmentInputSerializer` checks them against
    the session's protocol (its phases: session state ``study.protocol.phases``)."""

    first_ms = _ms(MAX_PHASE_MS, help_text="Measured on-screen time of the first image (every "
                   "protocol; 2AFC: the three images, shown at once), ms.")
    # Optional and nullable here (for the schema too); required for two-image protocols by
    # JudgmentInputSerializer.validate (a 400 "durations.blank_ms: This field is required.").
    blank_ms = _ms(
        MAX_PHASE_MS, required=False, allow_null=True,
        help_text="Measured blank between the two images, ms. Required (a number) for JND and "
        "rating-pair studies (phases first_ms, blank_ms, second_ms); 2AFC, single-image "
        "rating and label studies (phase first_ms only) leave it out or send null, a number "
        "there is a 400.",
    )
    second_ms = _ms(
        MAX_PHASE_MS, required=False, allow_null=True,
        help_text="Measured on-screen time of the second image, ms. Required (a number) for "
        "JND and rating-pair studies; 2AFC, single-image rating and label studies leave it "
        "out or send null, a number there is a 400.",
    )

    def to_internal_value(self, data):
        # blank_ms and second_ms left out are None, like null ones: whether the protocol needs
        # them is JudgmentInputSerializer's check.
        values = super().to_internal_value(data)
        return {"blank_ms": None, "second_ms": None, **values}


class DisplaySerializer(serializers.Serializer):
    """How the browser drew the trial's images (issue 17; see static/js/trials.js)."""

    scale = JSONIntegerField(
        min_value=1, max_value=64, help_text="Device pixels per image pixel (n) drawn."
    )
    device_pixel_ratio = JSONNumberField(
        min_value=0.05, max_value=100, help_text="window.devicePixelRatio while shown."
    )
    exact = JSONBooleanField(
        allow_null=True,
        help_text="Each image measured at natural size × n device pixels; null = the browser "
        "cannot measure it.",
    )


class JudgmentInputSerializer(serializers.Serializer):
    """Body of ``POST /api/sessions/<token>/judgments/`` (``display`` optional).

    ``context["spec"]``: the session's :class:`~studyapp.protocols.TrialSpec`. With it,
    ``response`` must be one of the protocol's answers (``"response: 'left' is not an answer
    of this jnd study; use one of 'same', 'different'"``) and ``durations`` must have exactly
    the protocol's phases (a missing one: ``"durations.blank_ms: This field is required."``;
    the phases a protocol does not have are stored as ``None``). Without it (an unknown
    session, answered 404 next) only the types and ranges are checked.
    """

    position = JSONIntegerField(min_value=0, max_value=MAX_POSITION)
    # (not trimmed: " 3" is not the answer "3")
    response = ResponseField(
        max_length=Judgment._meta.get_field("response").max_length, trim_whitespace=False
    )
    response_time_ms = _ms(MAX_RESPONSE_TIME_MS)
    durations = DurationsSerializer()
    display = DisplaySerializer(required=False)
    idempotency_key = JSONStringField(
        min_length=8, max_length=Judgment._meta.get_field("idempotency_key").max_length,
        help_text="The client's id of this judgment (e.g. a UUID): re-sending the identical "
        "body with it is a 200, another body with it a 409. Leading and trailing whitespace "
        "is trimmed before the length is checked; NUL characters are a 400.",
    )

    def validate(self, attrs):
        spec: TrialSpec | None = self.context.get("spec")
        if spec is None:
            return attrs
        errors: dict = {}
        try:
            check_answer(spec, attrs["response"])
        except BadResponse as exc:
            errors["response"] = [str(exc)]
        durations, duration_errors = check_durations(spec, attrs["durations"])
        if duration_errors:
            errors["durations"] = {k: [v] for k, v in duration_errors.items()}
        if errors:
            raise serializers.ValidationError(errors)
        attrs["durations"] = durations
        return attrs


class StoredDurationsSerializer(serializers.Serializer):
    """A stored judgment's measured durations, ms; null for a phase its protocol lacks."""

    first_ms = serializers.FloatField()
    blank_ms = serializers.FloatField(
        allow_null=True, help_text="null for 2AFC, single-image rating and label judgments."
    )
    second_ms = serializers.FloatField(
        allow_null=True, help_text="null for 2AFC, single-image rating and label judgments."
    )


class JudgmentSerializer(serializers.ModelSerializer):
    """A stored judgment as the API returns it."""

    position = serializers.IntegerField(source="trial.position")
    durations = serializers.SerializerMethodField()
    display = serializers.SerializerMethodField()

    class Meta:
        model = Judgment
        fields = [
            "position", "response", "response_time_ms", "durations", "display",
            "idempotency_key", "created_at",
        ]

    @extend_schema_field(DisplaySerializer(allow_null=True))
    def get_display(self, judgment: Judgment) -> dict | None:
        return _display_data(judgment)

    @extend_schema_field(StoredDurationsSerializer)
    def get_durations(self, judgment: Judgment) -> dict[str, float | None]:
        return {
            "first_ms": judgment.first_ms,
            "blank_ms": judgment.blank_ms,
            "second_ms": judgment.second_ms,
        }


def judgment_data(judgment: Judgment) -> dict:
    """What :class:`JudgmentSerializer` returns, built directly (no field machinery per
    request: the judgment POST is the hottest endpoint)."""
    return {
        "position": judgment.trial.position,
        "response": judgment.response,
        "response_time_ms": judgment.response_time_ms,
        "durations": {
            "first_ms": judgment.first_ms,
            "blank_ms": judgment.blank_ms,
            "second_ms": judgment.second_ms,
        },
        "display": _display_data(judgment),
        "idempotency_key": judgment.idempotency_key,
        "created_at": serializers.DateTimeField().to_representation(judgment.created_at),
    }


def _display_data(judgment: Judgment) -> dict | None:
    if judgment.display_scale is None:
        return None
    return {
        "scale": judgment.display_scale,
        "device_pixel_ratio": judgment.device_pixel_ratio,
        "exact": judgment.display_exact,
    }


class ClientInfoSerializer(serializers.Serializer):
    """Body of ``PATCH /api/sessions/<token>/``: the participant's display, as measured."""

    window_width = JSONIntegerField(min_value=0, max_value=100_000)
    window_height = JSONIntegerField(min_value=0, max_value=100_000)
    screen_width = JSONIntegerField(min_value=0, max_value=100_000, required=False)
    screen_height = JSONIntegerField(min_value=0, max_value=100_000, required=False)
    device_pixel_ratio = JSONNumberField(min_value=0, max_value=100)
    refresh_hz = JSONNumberField(
        min_value=0, max_value=1000, help_text="1000 / median rAF interval"
    )
    frame_ms = JSONNumberField(min_value=0, max_value=10_000, help_text="median rAF interval")
    frame_samples = JSONIntegerField(
        min_value=0, max_value=100_000, required=False, help_text="rAF intervals measured"
    )
    # Automation signals (studyapp.quality), counted by the runner since the page loaded.
    webdriver = serializers.BooleanField(
        required=False, help_text="navigator.webdriver: the browser is driven by automation."
    )
    pointer_events = JSONIntegerField(
        min_value=0, max_value=10**9, required=False,
        help_text="Trusted pointer events (down, move, wheel, touch) seen by the page.",
    )
    key_events = JSONIntegerField(
        min_value=0, max_value=10**9, required=False, help_text="Trusted keydown events."
    )
    hidden_stimuli = JSONIntegerField(
        min_value=0, max_value=10**6, required=False,
        help_text="Stimuli interrupted because the page was hidden.",
    )
    # Display (issue 17): zoom / device-pixel-ratio changes seen, and a refused display.
    zoom_changes = JSONIntegerField(
        min_value=0, max_value=10**6, required=False,
        help_text="Changes of window.devicePixelRatio (zoom, moved window) seen by the page.",
    )
    display_refused = serializers.BooleanField(
        required=False,
        help_text="The runner refused this display (the study's display_rule 'refuse').",
    )

    def validate_webdriver(self, value):
        if not isinstance(self.initial_data.get("webdriver"), bool):
            raise serializers.ValidationError("Must be a JSON boolean.")
        return value

    def validate_display_refused(self, value):
        if not isinstance(self.initial_data.get("display_refused"), bool):
            raise serializers.ValidationError("Must be a JSON boolean.")
        return value


class ProtocolSerializer(serializers.Serializer):
    """A protocol's trial (:class:`studyapp.protocols.TrialSpec`), for studies other than JND.

    What a judgment of the session must carry: ``response`` one of ``answers``, ``durations``
    exactly ``phases``. (A JND study's state has no such block: answers ``same``,
    ``different``; phases ``first_ms``, ``blank_ms``, ``second_ms``.)"""

    protocol = serializers.ChoiceField(
        choices=["jnd", "2afc", "rating", "label"],
        help_text="The study's protocol (only 2afc, rating or label are sent: a JND study's "
        "state has no protocol block).",
    )
    n_images = serializers.IntegerField(
        help_text="Images per trial (URL slots of each trial's `images`): 2afc 3 (reference, "
        "left, right); rating 2 (pair) or 1 (single image); label 1."
    )
    phases = serializers.ListField(
        child=serializers.ChoiceField(choices=["first_ms", "blank_ms", "second_ms"]),
        help_text="The durations a judgment must carry (numbers); the other duration fields "
        "are left out or null. 2afc, single-image rating, label: ['first_ms']; rating pairs: "
        "['first_ms', 'blank_ms', 'second_ms'].",
    )
    question = serializers.CharField(help_text="The question the runner asks, in words.")
    answers = serializers.ListField(
        child=serializers.CharField(),
        help_text="The accepted values of a judgment's `response`, exactly, in button order: "
        "2afc ['left', 'right']; rating ['1', …, 'N']; label the study's label set.",
    )
    keys = serializers.DictField(
        child=serializers.CharField(),
        help_text="Keyboard key (lower-case) → the answer it gives. Rating and label: digits "
        "1 … 9 for the first nine answers; 2afc: key_same → left, key_different → right.",
    )
    feedback = serializers.BooleanField(help_text="Practice trials with an answer get feedback.")


class StudySettingsSerializer(serializers.Serializer):
    """The protocol as the trial runner needs it (durations in ms, keys lower-case)."""

    title = serializers.CharField()
    first_ms = serializers.IntegerField(help_text="Intended duration of the first image, ms.")
    blank_ms = serializers.IntegerField(help_text="Intended blank between the images, ms.")
    second_ms = serializers.IntegerField(help_text="Intended duration of the second image, ms.")
    key_same = serializers.CharField(
        help_text="Key that answers 'same' (one character); other protocols: see "
        "protocol.keys."
    )
    key_different = serializers.CharField(
        help_text="Key that answers 'different'; other protocols: see protocol.keys."
    )
    break_every = serializers.IntegerField(
        help_text="A break is offered after this many main trials; 0 = no breaks."
    )
    display_scale = serializers.IntegerField(
        help_text="Device pixels per image pixel; 0 = the image's CSS size (n = device pixel "
        "ratio, display_rule when that is not whole)."
    )
    display_rule = serializers.ChoiceField(choices=["nearest", "reset_zoom", "refuse"])
    protocol = ProtocolSerializer(
        required=False,
        help_text="The trial of a study other than JND: its answers and measured phases. "
        "Absent: a JND study (answers same, different; phases first_ms, blank_ms, second_ms).",
    )


class StimulusSizeSerializer(serializers.Serializer):
    """The largest image of the session, in image pixels (drawn n device pixels each)."""

    width = serializers.IntegerField()
    height = serializers.IntegerField()


class TrialStateSerializer(serializers.Serializer):
    """One trial as the runner sees it: nothing about a main trial's pair is revealed."""

    position = serializers.IntegerField(min_value=0)
    images = serializers.ListField(
        child=serializers.CharField(),
        help_text="Opaque URLs of the trial's images in slot order (studyapp.image_tokens; "
        "JND: first, second; 2AFC: reference, left, right; label: the image).",
    )
    answered = serializers.BooleanField()
    practice = serializers.BooleanField(help_text="Practice trial: feedback, never analysed.")
    answer = serializers.CharField(
        required=False,
        help_text="Practice trials with a known answer only: the correct answer, for the "
        "feedback (one of the protocol's answers).",
    )
    example = serializers.BooleanField(
        required=False,
        help_text="Practice trials only: a perturbed pair of the study (not a catch pair), "
        "shown as the instructions' 'different' example.",
    )


class SessionStateSerializer(serializers.Serializer):
    """Body of ``GET /api/sessions/<token>/`` (see :func:`session_state`)."""

    study = StudySettingsSerializer()
    stimulus = StimulusSizeSerializer()
    trials = TrialStateSerializer(many=True)
    completed = serializers.BooleanField()


def session_state(session: Session) -> dict:
    """Body of ``GET /api/sessions/<token>/``: protocol, stimulus size, trials (practice first).

    A main trial is ``{"position", "images", "answered", "practice": false}``: its image URLs
    are opaque (``n_images`` of them, in slot order: :func:`studyapp.protocols.image_paths`)
    and nothing names its item, condition, side, class or control status. A practice trial
    adds ``"answer"`` where its item has a known one (:func:`studyapp.protocols.correct_answer`)
    so the runner can give feedback; practice items are never analysed, so that reveals nothing
    about the study's data. A study of another protocol than JND adds
    ``study["protocol"]`` (:meth:`studyapp.protocols.TrialSpec.to_dict`: question, answers,
    keys, phases, n_images, feedback); a JND study's state is what it was before protocols.
    """
    study = session.study
    spec = trial_spec(study)
    rows = list(
        session.trials.order_by("position").values_list(
            "position", "is_practice", "judgment__id", "pair__is_sentinel",
            "pair__natural_path", "pair__other_path", "pair__width", "pair__height",
            "pair__condition_id", "natural_first", "pair__third_path", "pair__class_name",
        )
    )
    urls = image_urls(session.token, [row[0] for row in rows], n_images=spec.n_images)
    jnd = spec.protocol == "jnd"
    trials, width, height = [], 0, 0
    for (position, practice, judgment_id, sentinel, natural, other, w, h, condition,
         natural_first, third, class_name) in rows:
        trial = {
            "position": position,
            "images": urls[position],
            "answered": judgment_id is not None,
            "practice": practice,
        }
        if practice:
            known = correct_answer(
                study, is_sentinel=sentinel, natural_first=natural_first, natural_path=natural,
                other_path=other, third_path=third, class_name=class_name,
            )
            if known is not None and spec.feedback:
                trial["answer"] = known
            if jnd:
                # A perturbed pair (scheduler.example_pair_ids): the "different" example.
                trial["example"] = condition is not None and trial["answer"] == "different"
        trials.append(trial)
        width, height = max(width, w), max(height, h)
    state = {
        "study": {
            "title": study.title,
            "first_ms": study.first_ms,
            "blank_ms": study.blank_ms,
            "second_ms": study.second_ms,
            "key_same": study.key_same.lower(),
            "key_different": study.key_different.lower(),
            "break_every": study.break_every,
            "display_scale": study.display_scale,
            "display_rule": study.display_rule,
        },
        "stimulus": {"width": width, "height": height},
        "trials": trials,
        "completed": session.completed_at is not None,
    }
    if not jnd:
        state["study"]["protocol"] = spec.to_dict()
    return state
