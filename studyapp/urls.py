"""Root URLs.

``/admin/`` Django admin (staff) · ``/api/staff/`` staff API · ``/api/schema/`` OpenAPI schema
(YAML; ``?format=json`` for JSON) · everything else: participant pages and API, ``/staff/``.
"""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/staff/", include("studyapp.staff_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("dashboard/", include("studyapp.dashboard_urls")),
    path("", include("studyapp.participant_urls")),
]

# Uncaught failures: 503 + Retry-After on a database outage, JSON under /api/ (studyapp.api).
handler500 = "studyapp.api.server_error"
# Mistyped links and refused requests: styled pages (JSON under /api/), studyapp.views.
handler404 = "studyapp.views.page_not_found"
handler400 = "studyapp.views.bad_request"
