"""Staff dashboard routes, mounted at ``/dashboard/`` (see :mod:`studyapp.dashboard`)."""

from django.urls import path

from . import dashboard

urlpatterns = [
    path("", dashboard.study_list, name="dashboard-studies"),
    path("<slug:slug>/", dashboard.study_detail, name="dashboard-study"),
    path("<slug:slug>/robustness/", dashboard.study_robustness, name="dashboard-robustness"),
    path(
        "<slug:slug>/robustness/<str:name>.<str:fmt>",
        dashboard.robustness_figure,
        name="dashboard-robustness-figure",
    ),
    path(
        "<slug:slug>/figures/<str:name>.<str:fmt>",
        dashboard.figure,
        name="dashboard-figure",
    ),
]
