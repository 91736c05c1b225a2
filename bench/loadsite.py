"""URLconf of the load benchmark's server: the app's own URLs plus ``/bench/ping/``.

``/bench/ping/`` is the "trivial Django view" the submit throughput is compared with: a plain
function view behind the same middleware stack (sessions, CSRF, auth, security, WhiteNoise) in
the same gunicorn workers, that touches no database and renders no template. Only
:mod:`bench.load_settings` mounts it; the app never serves it.
"""

from django.http import HttpRequest, HttpResponse
from django.urls import include, path


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [
    path("bench/ping/", ping, name="bench-ping"),
    path("", include("studyapp.urls")),
]
