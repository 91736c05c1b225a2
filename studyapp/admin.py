from django.contrib import admin, messages

from .models import Condition, Judgment, Pair, Participant, Session, Study, Trial
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


admin.site.register(Participant)
