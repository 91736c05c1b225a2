"""Participant-facing pages, the participant API and the staff overview (mounted at ``""``)."""

from django.urls import path

from . import participant_api, views

urlpatterns = [
    path("study/<slug:slug>/", views.study_start, name="study-start"),
    path("session/<str:token>/", views.session_page, name="session-page"),
    path("session/<str:token>/done/", views.session_done, name="session-done"),
    # Opaque per-(trial, slot) stimulus URLs: see studyapp.image_tokens.
    path("img/<str:token>/<str:key>/", views.trial_image, name="trial-image"),
    path("staff/", views.staff_home, name="staff-home"),
    path(
        "api/sessions/<str:token>/", participant_api.SessionStateView.as_view(), name="api-session"
    ),
    path(
        "api/sessions/<str:token>/judgments/",
        participant_api.JudgmentCreateView.as_view(),
        name="api-judgments",
    ),
    path(
        "api/sessions/<str:token>/complete/",
        participant_api.SessionCompleteView.as_view(),
        name="api-complete",
    ),
]
