"""Django admin for staff.

Stored data stays as the participants produced it:

- a Condition or Pair of a study that has judgments cannot be changed or deleted (its page is
  read-only), and a judged study cannot be deleted;
- Judgments are read-only everywhere, and neither Judgments nor Sessions (nor their Trials) can
  be added by hand: only the scheduler and the participant API create them;
- defense runs, results and checks (``train_defense`` / ``evaluate_defense``) and calibrations
  (``calibrate``) are read-only records of those commands.
"""

from django.contrib import admin, messages

from .models import (
    Calibration,
    Condition,
    DefenseCheck,
    DefenseResult,
    DefenseRun,
    Judgment,
    Pair,
    Participant,
    Session,
    Study,
    Trial,
)
from .quality import STAFF_EXCLUDE, STAFF_INCLUDE, apply_exclusions, set_staff_decision, summary


def _judged(study) -> bool:
    return study is not None and study.pk is not None and study.has_judgments()


class LockedWhenJudged:
    """Change and delete refused for an object whose study has judgments (its page becomes
    read-only); no bulk delete (it would bypass the per-object check)."""

    def study_of(self, obj):
        return obj.study

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is not None and _judged(self.study_of(obj)):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        if obj is not None and _judged(self.study_of(obj)):
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


class ReadOnlyAdmin(admin.ModelAdmin):
    """A record written by a command: viewed here, never added, changed or deleted."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ConditionInline(admin.TabularInline):
    """A study's conditions; read-only (no add, change or delete) once it has judgments."""

    model = Condition
    extra = 0

    def has_add_permission(self, request, obj=None) -> bool:
        return not _judged(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request, obj=None) -> bool:
        return not _judged(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return not _judged(obj) and super().has_delete_permission(request, obj)


def _report_quality(modeladmin, request, studies) -> None:
    for study in studies:
        s = summary(apply_exclusions(study), study)
        modeladmin.message_user(
            request,
            f"{study.slug}: {s['n_excluded']} of {s['n_sessions']} completed sessions excluded"
            f" (sentinel false alarms {s['n_violating']['sentinel_false_alarm']}, catch trials"
            f" {s['n_violating']['catch_hit_rate']}, fast responses"
            f" {s['n_violating']['fast_share']}, by staff {s['n_excluded_by_staff']});"
            f" flagged: same IP {s['n_flagged_ip']}, same browser {s['n_flagged_browser']}.",
            messages.SUCCESS,
        )


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "is_active", "trials_per_session", "created_at"]
    inlines = [ConditionInline]
    readonly_fields = ["generation", "created_at"]
    actions = ["apply_quality_control"]

    @admin.action(description="Apply the quality-control rules (exclude failing sessions)")
    def apply_quality_control(self, request, queryset):
        _report_quality(self, request, queryset)

    def has_delete_permission(self, request, obj=None) -> bool:
        if _judged(obj):
            return False  # deleting it would delete its judgments
        return super().has_delete_permission(request, obj)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions


@admin.register(Condition)
class ConditionAdmin(LockedWhenJudged, admin.ModelAdmin):
    list_display = ["spec", "study", "threat_model", "bound", "label"]
    list_filter = ["study", "threat_model"]
    search_fields = ["spec", "label"]


@admin.register(Pair)
class PairAdmin(LockedWhenJudged, admin.ModelAdmin):
    list_display = ["key", "study", "condition", "is_sentinel", "is_catch", "attack_success"]
    list_filter = ["study", "is_sentinel", "is_catch", "condition"]
    search_fields = ["key", "source_image"]


class TrialInline(admin.TabularInline):
    model = Trial
    extra = 0
    readonly_fields = ["position", "pair", "natural_first", "is_practice"]
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # trials are the scheduler's


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["id", "participant", "started_at", "completed_at", "excluded"]
    list_filter = ["participant__study", "excluded", "participant__source"]
    search_fields = ["participant__external_id", "assignment_id", "exclusion_reason"]
    readonly_fields = [
        "token",
        "completion_code",
        "started_at",
        "client_info",
        "user_agent",
        "ip_hash",
        "browser_hash",
        "quality",
    ]
    inlines = [TrialInline]
    actions = ["exclude_by_staff", "include_by_staff", "clear_staff_decision"]

    @admin.action(description="Exclude (staff decision, overrides the rules)")
    def exclude_by_staff(self, request, queryset):
        n = set_staff_decision(queryset, STAFF_EXCLUDE, f"excluded by staff ({request.user})")
        self.message_user(request, f"{n} session(s) excluded.", messages.SUCCESS)

    @admin.action(description="Include (staff decision, overrides the rules)")
    def include_by_staff(self, request, queryset):
        n = set_staff_decision(queryset, STAFF_INCLUDE)
        self.message_user(request, f"{n} session(s) included.", messages.SUCCESS)

    @admin.action(description="Clear the staff decision and re-apply the rules")
    def clear_staff_decision(self, request, queryset):
        set_staff_decision(queryset, None)
        studies = Study.objects.filter(participants__sessions__in=queryset).distinct()
        _report_quality(self, request, studies)

    def has_add_permission(self, request) -> bool:
        return False  # sessions start through the participant link (the scheduler)


@admin.register(Judgment)
class JudgmentAdmin(ReadOnlyAdmin):
    """Participants' answers: read-only (a judgment always belongs to a judged study)."""

    list_display = ["trial", "response", "response_time_ms", "first_ms", "blank_ms", "second_ms"]
    list_filter = ["response", "trial__session__participant__study"]


class ThreatModelFilter(admin.SimpleListFilter):
    """Calibrations with presets for a threat model (the keys of ``presets``)."""

    title = "threat model"
    parameter_name = "threat_model"

    def lookups(self, request, model_admin):
        names: set[str] = set()
        for presets in Calibration.objects.values_list("presets", flat=True):
            names.update(presets or {})
        return [(name, name) for name in sorted(names)]

    def queryset(self, request, queryset):
        return queryset.filter(presets__has_key=self.value()) if self.value() else queryset


@admin.register(Calibration)
class CalibrationAdmin(admin.ModelAdmin):
    """Stored by ``manage.py calibrate``: the fitted values are shown, never edited here."""

    list_display = ["id", "study", "created_at", "threat_models", "targets", "n_judgments",
                    "n_sessions", "sigmoid", "code_version"]
    list_filter = ["study", ThreatModelFilter, "created_at"]
    list_select_related = ["study"]
    search_fields = ["study__slug", "code_version"]
    date_hierarchy = "created_at"
    readonly_fields = ["study", "created_at", "targets", "presets", "fit", "counts", "settings",
                       "code_version"]

    def has_add_permission(self, request) -> bool:
        return False  # only ``calibrate`` fits one

    @admin.display(description="threat models")
    def threat_models(self, obj: Calibration) -> str:
        return ", ".join(sorted(obj.presets or {}))

    @admin.display(description="judgments")
    def n_judgments(self, obj: Calibration):
        return (obj.counts or {}).get("n_judgments")

    @admin.display(description="sessions")
    def n_sessions(self, obj: Calibration):
        return (obj.counts or {}).get("n_sessions")

    @admin.display(description="sigmoid")
    def sigmoid(self, obj: Calibration):
        return (obj.settings or {}).get("sigmoid")


@admin.register(DefenseRun)
class DefenseRunAdmin(ReadOnlyAdmin):
    """Recorded by ``manage.py train_defense``; the weights live in ``run_dir``."""

    list_display = ["name", "study", "method", "arch", "dataset", "status", "created_at",
                    "finished_at"]
    list_filter = ["study", "method", "status", "dataset"]
    search_fields = ["name", "method", "dataset_label", "run_dir"]


@admin.register(DefenseResult)
class DefenseResultAdmin(ReadOnlyAdmin):
    """Stored by ``manage.py evaluate_defense``; the dashboard's robustness page shows them."""

    list_display = ["run", "study", "threat_model", "column", "bound", "perceptibility",
                    "accuracy", "n_images", "created_at"]
    list_filter = ["study", "threat_model", "run"]
    list_select_related = ["run", "study"]
    search_fields = ["run__name", "column", "spec"]


@admin.register(DefenseCheck)
class DefenseCheckAdmin(ReadOnlyAdmin):
    """Gradient-masking sanity checks stored by ``manage.py evaluate_defense --sanity``."""

    list_display = ["run", "study", "name", "detail", "value", "passed", "created_at"]
    list_filter = ["study", "name", "passed"]
    list_select_related = ["run", "study"]


admin.site.register(Participant)
