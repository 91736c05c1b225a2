"""Staff JSON API: ``/api/staff/...`` (studies, progress, export, quality control,
robustness of defenses).

Staff only (``is_staff``, DRF's ``IsAdminUser``) through the Django login session; unsafe
methods need the CSRF token (DRF's SessionAuthentication enforces it for logged-in users).
Anonymous and non-staff requests get 403 in the API's JSON error shape. Limited per staff
user by the ``staff`` throttle scope (:mod:`studyapp.throttling`).

The export carries the raw recruitment ids (MTurk workerId, Prolific PID): they are what
staff need to approve, pay and bonus workers, and only staff can read it.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAdminUser
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .models import Study
from .quality import apply_exclusions, compute_quality, summary
from .reports import export_rows, study_counts, study_progress
from .schema import errors
from .throttling import STAFF

TAG = ["staff"]


class StaffAPIView(APIView):
    permission_classes = [IsAdminUser]
    throttle_scope = STAFF

    def get_study(self, slug: str) -> Study:
        return get_object_or_404(Study, slug=slug)

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Cache-Control"] = "no-store"
        return response


# ----------------------------------------------------------------------------- studies


class StudySummarySerializer(serializers.Serializer):
    """A study and its counts (:func:`studyapp.reports.study_counts`: the same as ``/staff/``)."""

    COUNTS = (
        "n_conditions", "n_pairs", "n_sentinel_pairs", "n_catch_pairs", "n_sessions",
        "n_completed", "n_excluded", "n_judgments", "n_practice_judgments",
    )
    slug = serializers.SlugField()
    title = serializers.CharField()
    is_active = serializers.BooleanField()
    created_at = serializers.DateTimeField()
    judgments_per_pair = serializers.IntegerField(help_text="K: judgments wanted per pair.")
    n_conditions = serializers.IntegerField()
    n_pairs = serializers.IntegerField(help_text="Pairs with a condition (not sentinel/catch).")
    n_sentinel_pairs = serializers.IntegerField()
    n_catch_pairs = serializers.IntegerField()
    n_sessions = serializers.IntegerField()
    n_completed = serializers.IntegerField()
    n_excluded = serializers.IntegerField()
    n_judgments = serializers.IntegerField(help_text="Judgments of main trials, all sessions.")
    n_practice_judgments = serializers.IntegerField(
        help_text="Judgments of practice trials (never analysed)."
    )
    participant_url = serializers.URLField()
    progress_url = serializers.URLField()
    export_url = serializers.URLField()


class StudyListView(StaffAPIView):
    @extend_schema(
        tags=TAG,
        summary="Every study with pair, session and judgment counts",
        responses={200: StudySummarySerializer(many=True), **errors(403, 429)},
    )
    def get(self, request: Request) -> Response:
        counts = study_counts()
        rows = []
        for study in Study.objects.order_by("-created_at", "slug"):
            n = counts[study.pk]
            url = request.build_absolute_uri
            rows.append(
                {
                    "slug": study.slug,
                    "title": study.title,
                    "is_active": study.is_active,
                    "created_at": study.created_at,
                    "judgments_per_pair": study.judgments_per_pair,
                    **{key: n[key] for key in StudySummarySerializer.COUNTS},
                    "participant_url": url(reverse("study-start", args=[study.slug])),
                    "progress_url": url(reverse("staff-api-progress", args=[study.slug])),
                    "export_url": url(reverse("staff-api-export", args=[study.slug])),
                }
            )
        return Response(StudySummarySerializer(rows, many=True).data)


# ----------------------------------------------------------------------------- progress


class ConditionProgressSerializer(serializers.Serializer):
    condition = serializers.CharField(help_text="Attack spec, or 'sentinel' / 'catch'.")
    threat_model = serializers.CharField()
    bound = serializers.FloatField(allow_null=True)
    label = serializers.CharField(allow_blank=True)
    n_pairs = serializers.IntegerField()
    n_judgments = serializers.IntegerField(help_text="Main-trial judgments, all sessions.")
    n_judgments_excluded = serializers.IntegerField(help_text="…of them in excluded sessions.")
    n_pairs_at_k = serializers.IntegerField(
        allow_null=True,
        help_text="Pairs with at least K judgments from sessions not excluded (null for"
        " sentinel/catch pairs, which have no K).",
    )


class SessionCountsSerializer(serializers.Serializer):
    started = serializers.IntegerField()
    completed = serializers.IntegerField()
    in_progress = serializers.IntegerField(help_text="Neither completed nor abandoned.")
    abandoned = serializers.IntegerField(help_text="Leases expired before completion.")
    excluded = serializers.IntegerField()


class ProgressSerializer(serializers.Serializer):
    study = serializers.SlugField()
    judgments_per_pair = serializers.IntegerField()
    conditions = ConditionProgressSerializer(many=True)
    sessions = SessionCountsSerializer()
    n_judgments_needed = serializers.IntegerField(help_text="K × pairs with a condition.")
    n_judgments_valid = serializers.IntegerField(
        help_text="Judgments towards that target: not excluded, at most K per pair."
    )


class StudyProgressView(StaffAPIView):
    @extend_schema(
        tags=TAG,
        summary="Progress towards K judgments per pair, per condition; session counts",
        responses={200: ProgressSerializer, **errors(403, 404, 429)},
    )
    def get(self, request: Request, slug: str) -> Response:
        return Response(ProgressSerializer(study_progress(self.get_study(slug))).data)


# ----------------------------------------------------------------------------- export

class ExportRowSerializer(serializers.Serializer):
    """One judgment of a main trial. Distance columns (``l2``, ``linf``, ``ssim``,
    ``lpips_alexnet`` …, as measured on the pair) follow the fixed columns."""

    study = serializers.SlugField()
    session_id = serializers.IntegerField()
    participant_source = serializers.ChoiceField(choices=["link", "mturk", "prolific"])
    participant_id = serializers.CharField(help_text="MTurk workerId / Prolific PID / random id.")
    assignment_id = serializers.CharField(allow_blank=True)
    hit_id = serializers.CharField(allow_blank=True)
    external_study_id = serializers.CharField(allow_blank=True)
    external_session_id = serializers.CharField(allow_blank=True)
    session_completed = serializers.BooleanField()
    session_excluded = serializers.BooleanField()
    exclusion_reason = serializers.CharField(allow_blank=True)
    trial_position = serializers.IntegerField()
    pair_id = serializers.IntegerField()
    pair_key = serializers.CharField()
    source_image = serializers.CharField()
    condition = serializers.CharField(allow_null=True, help_text="Attack spec; null for controls.")
    threat_model = serializers.CharField(allow_null=True)
    bound = serializers.FloatField(allow_null=True)
    condition_label = serializers.CharField(allow_null=True)
    is_sentinel = serializers.BooleanField()
    is_catch = serializers.BooleanField()
    natural_first = serializers.BooleanField()
    response = serializers.ChoiceField(choices=["same", "different"])
    response_time_ms = serializers.FloatField()
    first_ms = serializers.FloatField(help_text="Measured, ms.")
    blank_ms = serializers.FloatField(help_text="Measured, ms.")
    second_ms = serializers.FloatField(help_text="Measured, ms.")
    display_scale = serializers.IntegerField(
        allow_null=True, help_text="Device pixels per image pixel drawn (studyapp.display)."
    )
    device_pixel_ratio = serializers.FloatField(
        allow_null=True, help_text="window.devicePixelRatio while the pair was shown."
    )
    display_exact = serializers.BooleanField(
        allow_null=True, help_text="Drawn at exactly natural × n device pixels; False: resampled."
    )
    judged_at = serializers.DateTimeField()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


class CSVRenderer(BaseRenderer):
    """``text/csv`` with a header row; the view names the columns in ``renderer_context``."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        out = io.StringIO()
        if isinstance(data, dict) and "error" in data:  # an error response: one-row table
            columns, rows = list(data), [data]
        else:
            columns = (renderer_context or {}).get("csv_columns") or (list(data[0]) if data else [])
            rows = data
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
        return out.getvalue().encode(self.charset)


class StudyExportView(StaffAPIView):
    renderer_classes = [JSONRenderer, CSVRenderer]

    @extend_schema(
        tags=TAG,
        summary="Every judgment of the study's main trials (CSV or JSON)",
        description="One row per judgment of a main trial (practice trials are left out), with"
        " the pair's condition and distances and the session's exclusion flag and reason."
        " Excluded sessions are included, flagged. `?format=csv` (or `Accept: text/csv`)"
        " gives a CSV file; JSON is the default.",
        parameters=[
            OpenApiParameter(
                "format", OpenApiTypes.STR, OpenApiParameter.QUERY, enum=["csv", "json"]
            )
        ],
        responses={
            (200, "application/json"): ExportRowSerializer(many=True),
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="CSV file."),
            **errors(403, 404, 406, 429),
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        study = self.get_study(slug)
        columns, rows = export_rows(study)
        response = Response(rows)
        if getattr(request.accepted_renderer, "format", "") == "csv":
            response["Content-Disposition"] = f'attachment; filename="{study.slug}-judgments.csv"'
        self.csv_columns = columns
        return response

    def get_renderer_context(self) -> dict[str, Any]:
        context = super().get_renderer_context()
        context["csv_columns"] = getattr(self, "csv_columns", None)
        return context


# ----------------------------------------------------------------------------- quality


class SessionQualitySerializer(serializers.Serializer):
    session_id = serializers.IntegerField()
    participant = serializers.CharField(help_text="source:id")
    completed = serializers.BooleanField()
    n_main_trials = serializers.IntegerField()
    n_answered = serializers.IntegerField()
    n_sentinel = serializers.IntegerField()
    n_sentinel_different = serializers.IntegerField()
    sentinel_false_alarm_rate = serializers.FloatField(allow_null=True)
    n_catch = serializers.IntegerField()
    n_catch_different = serializers.IntegerField()
    catch_hit_rate = serializers.FloatField(allow_null=True)
    n_fast = serializers.IntegerField()
    fast_share = serializers.FloatField(allow_null=True)
    ip_shared_with = serializers.ListField(
        child=serializers.IntegerField(), help_text="Other participant ids with the same IP hash."
    )
    browser_shared_with = serializers.ListField(child=serializers.IntegerField())
    protocol = serializers.CharField(help_text="jnd, 2afc, rating or label (issue 18).")
    n_control = serializers.IntegerField(
        help_text="Answered main-trial control items with a known answer (sentinels, 2AFC "
        "control triplets, rating anchors, label gold items)."
    )
    n_control_wrong = serializers.IntegerField()
    control_error_rate = serializers.FloatField(
        allow_null=True, help_text="Share of control items answered wrongly "
        "(Study.max_sentinel_false_alarm bounds it)."
    )
    n_retest = serializers.IntegerField(help_text="Rating: items rated twice in the session.")
    retest_rho = serializers.FloatField(
        allow_null=True, help_text="Rating: Spearman ρ of first against repeat rating."
    )
    flags = serializers.ListField(child=serializers.CharField())
    violations = serializers.ListField(child=serializers.CharField())
    staff_decision = serializers.ChoiceField(choices=["exclude", "include"], allow_null=True)
    excluded = serializers.BooleanField()
    exclusion_reason = serializers.CharField(allow_blank=True)


class QualityRulesSerializer(serializers.Serializer):
    fast_response_ms = serializers.IntegerField()
    max_sentinel_false_alarm = serializers.FloatField(allow_null=True)
    min_catch_hit_rate = serializers.FloatField(allow_null=True)
    max_fast_share = serializers.FloatField(allow_null=True)


class QualityTableSerializer(serializers.Serializer):
    study = serializers.SlugField()
    applied = serializers.BooleanField(help_text="True when the exclusions were stored.")
    rules = QualityRulesSerializer()
    n_sessions = serializers.IntegerField()
    n_excluded = serializers.IntegerField()
    n_excluded_by_staff = serializers.IntegerField()
    n_violating = serializers.DictField(child=serializers.IntegerField())
    n_flagged_ip = serializers.IntegerField()
    n_flagged_browser = serializers.IntegerField()
    n_flagged_retest = serializers.IntegerField(
        required=False, help_text="Rating: sessions flagged for a low test–retest correlation."
    )
    sessions = SessionQualitySerializer(many=True)


class QualityRequestSerializer(serializers.Serializer):
    include_incomplete = serializers.BooleanField(
        default=False, help_text="Also evaluate sessions that are not completed."
    )


class StudyQualityView(StaffAPIView):
    def _table(self, study: Study, rows, applied: bool) -> Response:
        data = {
            **summary(rows, study),
            "applied": applied,
            "sessions": [q.as_dict() for q in rows],
        }
        return Response(QualityTableSerializer(data).data)

    @extend_schema(
        tags=TAG,
        summary="Quality-control table as the rules would decide now (writes nothing)",
        parameters=[OpenApiParameter("include_incomplete", OpenApiTypes.BOOL)],
        responses={200: QualityTableSerializer, **errors(400, 403, 404, 429)},
    )
    def get(self, request: Request, slug: str) -> Response:
        params = QualityRequestSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        study = self.get_study(slug)
        rows = compute_quality(study, **params.validated_data)
        return self._table(study, rows, applied=False)

    @extend_schema(
        tags=TAG,
        summary="Apply the study's exclusion rules and store the result",
        request=QualityRequestSerializer,
        responses={200: QualityTableSerializer, **errors(400, 403, 404, 413, 429)},
    )
    def post(self, request: Request, slug: str) -> Response:
        body = QualityRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        study = self.get_study(slug)
        rows = apply_exclusions(study, **body.validated_data)
        return self._table(study, rows, applied=True)


# ----------------------------------------------------------------------------- robustness


class DefenseAccuracySerializer(serializers.Serializer):
    run = serializers.CharField(help_text="DefenseRun name.")
    column = serializers.CharField(help_text="The engine's table column, e.g. 'linf 0.03137'.")
    threat_model = serializers.CharField()
    label = serializers.CharField(allow_blank=True, help_text="Bound label: a named bound"
                                  " (small/medium/large/cifar10), a calibrated level, or ''.")
    kind = serializers.ChoiceField(choices=["named", "calibrated", "labelled", "numeric"])
    bound = serializers.FloatField(allow_null=True, help_text="In `units`.")
    units = serializers.CharField()
    condition = serializers.CharField(help_text="Short label, e.g. 'L2 · medium (ε = 4.71)'.")
    spec = serializers.CharField(allow_blank=True, help_text="The spec the engine ran.")
    accuracy = serializers.FloatField(help_text="Robust accuracy, a fraction in [0, 1].")
    n_images = serializers.IntegerField()
    dataset = serializers.CharField()


class DefenseSummarySerializer(serializers.Serializer):
    run = serializers.CharField()
    method = serializers.CharField()
    arch = serializers.CharField()
    dataset = serializers.CharField()
    n_images = serializers.IntegerField()
    clean = serializers.FloatField(allow_null=True)
    union = serializers.FloatField(allow_null=True, help_text="Correct under every threat"
                                   " model at once.")
    unseen_mean = serializers.FloatField(allow_null=True, help_text="Mean accuracy over the"
                                         " threat models not trained against.")


class DefenseCheckSerializer(serializers.Serializer):
    run = serializers.CharField()
    check = serializers.CharField(help_text="bound_monotone, unbounded or square_not_stronger.")
    detail = serializers.CharField(allow_blank=True)
    value = serializers.CharField(allow_blank=True)
    passed = serializers.BooleanField()


class EqualPerceptibilitySerializer(serializers.Serializer):
    run = serializers.CharField()
    threat_model = serializers.CharField()
    label = serializers.CharField()
    condition = serializers.CharField()
    condition_spec = serializers.CharField()
    bound = serializers.FloatField(help_text="The condition's bound, in `units`.")
    defense_bound = serializers.FloatField(allow_null=True, help_text="The bound the defense"
                                           " was attacked at, in `units`.")
    units = serializers.CharField()
    perceptibility = serializers.FloatField(allow_null=True, help_text="Share of people"
                                            " answering 'different'.")
    boot_low = serializers.FloatField(allow_null=True, help_text="95 % participant bootstrap.")
    boot_high = serializers.FloatField(allow_null=True)
    n_judgments = serializers.IntegerField(allow_null=True)
    accuracy = serializers.FloatField()
    n_images = serializers.IntegerField()


class RobustnessSerializer(serializers.Serializer):
    study = serializers.SlugField()
    accuracy = DefenseAccuracySerializer(many=True)
    summary = DefenseSummarySerializer(many=True)
    sanity = DefenseCheckSerializer(many=True)
    equal_perceptibility = EqualPerceptibilitySerializer(many=True)


class StudyRobustnessView(StaffAPIView):
    @extend_schema(
        tags=TAG,
        summary="Defenses evaluated against the study: accuracy per threat model, union,"
        " masking checks, accuracy at equal human perceptibility",
        description="What `manage.py evaluate_defense --study SLUG` stored, as the dashboard's"
        " robustness page shows it (studyapp.robustness). Human perceptibility leaves"
        " simulated observers and excluded sessions out.",
        responses={200: RobustnessSerializer, **errors(403, 404, 429)},
    )
    def get(self, request: Request, slug: str) -> Response:
        from . import robustness

        study = self.get_study(slug)
        tables = robustness.robustness_tables(study, robustness.people_report(study)[0])
        data = {"study": study.slug, **{k: robustness.records(v) for k, v in tables.items()}}
        return Response(RobustnessSerializer(data).data)
