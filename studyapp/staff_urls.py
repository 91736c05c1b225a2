"""Staff API routes, mounted at ``/api/staff/`` (see :mod:`studyapp.staff_api`)."""

from django.urls import path

from . import staff_api

urlpatterns = [
    path("studies/", staff_api.StudyListView.as_view(), name="staff-api-studies"),
    path(
        "studies/<slug:slug>/progress/",
        staff_api.StudyProgressView.as_view(),
        name="staff-api-progress",
    ),
    path(
        "studies/<slug:slug>/export/", staff_api.StudyExportView.as_view(), name="staff-api-export"
    ),
    path(
        "studies/<slug:slug>/quality/",
        staff_api.StudyQualityView.as_view(),
        name="staff-api-quality",
    ),
    path(
        "studies/<slug:slug>/robustness/",
        staff_api.StudyRobustnessView.as_view(),
        name="staff-api-robustness",
    ),
]
