"""URLconf of the load benchmark's server: the app's own URLs plus ``/bench/ping/``.

``/bench/ping/`` is the "trivial Django view" the submit throughput is compared with: a plain
function view behind the same middleware stack (sessions, CSRF, auth, security, WhiteNoise) in
the same gunicorn workers, that touches no database and renders no template. Only
:mod:`bench.load_settings` mounts it; the app never serves it.

Django reads the error handlers (``handler400`` … ``handler500``) from the *root* URLconf only,
so the production ones are taken over from :mod:`studyapp.urls` here: under load a database
outage must answer as in production (JSON 503 with ``Retry-After`` under ``/api/``), not with
Django's stock HTML page.
"""

from django.http import HttpRequest, HttpResponse
from django.urls import include, path

from studyapp import urls as production

ERROR_HANDLERS = ("handler400", "handler403", "handler404", "handler500")
for _name in ERROR_HANDLERS:
    if hasattr(production, _name):
        globals()[_name] = getattr(production, _name)


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"ok", content_type="text/plain")


urlpatterns = [
    path("bench/ping/", ping, name="bench-ping"),
    path("", include("studyapp.urls")),
]
