"""What the participant API reads and writes.

Nothing here names a condition, a bound, a pair or whether a trial is a sentinel: the trial
runner only ever sees positions and opaque per-trial image URLs.
"""

from __future__ import annotations

from django.urls import reverse
from rest_framework import serializers

from .models import Judgment, Session

MAX_RESPONSE_TIME_MS = 10 * 60 * 1000
MAX_PHASE_MS = 60 * 1000


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


def _ms(max_value: float) -> JSONNumberField:
    return JSONNumberField(min_value=0, max_value=max_value)


class DurationsSerializer(serializers.Serializer):
    """On-screen durations measured by the browser (differences of rAF timestamps), in ms."""

    first_ms = _ms(MAX_PHASE_MS)
    blank_ms = _ms(MAX_PHASE_MS)
    second_ms = _ms(MAX_PHASE_MS)


class JudgmentInputSerializer(serializers.Serializer):
    """Body of ``POST /api/sessions/<token>/judgments/``."""

    position = JSONIntegerField(min_value=0)
    response = serializers.ChoiceField(choices=[c for c, _ in Judgment.RESPONSES])
    response_time_ms = _ms(MAX_RESPONSE_TIME_MS)
    durations = DurationsSerializer()
    idempotency_key = serializers.CharField(
        min_length=8, max_length=Judgment._meta.get_field("idempotency_key").max_length
    )


class JudgmentSerializer(serializers.ModelSerializer):
    """A stored judgment as the API returns it."""

    position = serializers.IntegerField(source="trial.position")
    durations = serializers.SerializerMethodField()

    class Meta:
        model = Judgment
        fields = [
            "position", "response", "response_time_ms", "durations", "idempotency_key",
            "created_at",
        ]

    def get_durations(self, judgment: Judgment) -> dict[str, float]:
        return {
            "first_ms": judgment.first_ms,
            "blank_ms": judgment.blank_ms,
            "second_ms": judgment.second_ms,
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


def session_state(session: Session) -> dict:
    """Body of ``GET /api/sessions/<token>/``: protocol timings and the trial list."""
    study = session.study
    answered = set(
        Judgment.objects.filter(trial__session=session).values_list("trial__position", flat=True)
    )
    trials = [
        {
            "position": position,
            "images": [
                reverse("trial-image", args=[session.token, position, slot]) for slot in (1, 2)
            ],
            "answered": position in answered,
        }
        for position in session.trials.order_by("position").values_list("position", flat=True)
    ]
    return {
        "study": {
            "title": study.title,
            "first_ms": study.first_ms,
            "blank_ms": study.blank_ms,
            "second_ms": study.second_ms,
        },
        "trials": trials,
        "completed": session.completed_at is not None,
    }
