from django.contrib import admin, messages

from .models import Calibration, Condition, Judgment, Pair, Participant, Session, Study, Trial
from .quality import STAFF_EXCLUDE, STAFF_INCLUDE, apply_exclusions, set_staff_decision, summary


class ConditionInline(admin.TabularInline):
    model = Condition
    extra = 0


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


@admin.register(Pair)
class PairAdmin(admin.ModelAdmin):
    list_display = ["key", "study", "condition", "is_sentinel", "is_catch", "attack_success"]
    list_filter = ["study", "is_sentinel", "is_catch", "condition"]
    search_fields = ["key", "source_image"]


class TrialInline(admin.TabularInline):
    model = Trial
    extra = 0
    readonly_fields = ["position", "pair", "natural_first", "is_practice"]
    can_delete = False


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


@admin.register(Judgment)
class JudgmentAdmin(admin.ModelAdmin):
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


admin.site.register(Participant)
