from django.contrib import admin

from .models import Condition, Judgment, Pair, Participant, Session, Study, Trial


class ConditionInline(admin.TabularInline):
    model = Condition
    extra = 0


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ["slug", "title", "is_active", "trials_per_session", "created_at"]
    inlines = [ConditionInline]
    readonly_fields = ["generation", "created_at"]


@admin.register(Pair)
class PairAdmin(admin.ModelAdmin):
    list_display = ["key", "study", "condition", "is_sentinel", "attack_success"]
    list_filter = ["study", "is_sentinel", "condition"]
    search_fields = ["key", "source_image"]


class TrialInline(admin.TabularInline):
    model = Trial
    extra = 0
    readonly_fields = ["position", "pair", "natural_first"]
    can_delete = False


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["id", "participant", "started_at", "completed_at"]
    readonly_fields = ["token", "completion_code", "started_at", "client_info", "user_agent"]
    inlines = [TrialInline]


@admin.register(Judgment)
class JudgmentAdmin(admin.ModelAdmin):
    list_display = ["trial", "response", "response_time_ms", "first_ms", "blank_ms", "second_ms"]
    list_filter = ["response", "trial__session__participant__study"]


admin.site.register(Participant)
