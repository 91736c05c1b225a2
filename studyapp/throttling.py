"""Rate limits for the API (DRF throttling), shared by every gunicorn worker.

One throttle class, :class:`ScopedTokenRateThrottle`, is the API's default. It picks a scope
per request and keys the counter by who is asking:

``participant-write``
    Unsafe requests (POST/PUT/PATCH/DELETE) to a view addressed by a session token (a
    ``token`` URL kwarg), or to any view that sets ``throttle_scope = "participant-write"``.
    Keyed by the **session token**, not the IP: a whole lab or a university behind one NAT
    address would otherwise share one budget. Reads (the trial list) are never limited.
``staff``
    Views that set ``throttle_scope = "staff"``; keyed by the staff user.
any other ``throttle_scope``
    Keyed by the user when logged in, else by the (hashed) client address.

Rates come from ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` and are read at request time (so
tests and settings overrides see changes). Counters live in Django's default cache, which
``settings`` makes a database table: every worker sees the same counts. DRF's sliding-window
counter is read-modify-write, so two simultaneous requests of one key may both pass at the
limit's edge: a limit, not an exact quota. Keys never contain a raw token or address (hashed).

A throttled request gets 429 with a ``Retry-After`` header and the API's JSON error shape,
before the view runs: it writes nothing.
"""

from __future__ import annotations

import hashlib

from django.core.exceptions import ImproperlyConfigured
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle

from .fingerprints import client_ip, hash_ip

PARTICIPANT_WRITE = "participant-write"
STAFF = "staff"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class ScopedTokenRateThrottle(SimpleRateThrottle):
    """The API's rate limit: scope from the view and the request, key from the credential."""

    scope_attr = "throttle_scope"

    def __init__(self):  # the rate depends on the view: resolved in allow_request
        pass

    def scope_for(self, request, view) -> str | None:
        scope = getattr(view, self.scope_attr, None)
        if scope == PARTICIPANT_WRITE or (scope is None and "token" in getattr(view, "kwargs", {})):
            return None if request.method in SAFE_METHODS else PARTICIPANT_WRITE
        return scope

    def get_rate(self) -> str | None:
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        if self.scope not in rates:
            raise ImproperlyConfigured(
                f"no rate for throttle scope {self.scope!r} in"
                " REST_FRAMEWORK['DEFAULT_THROTTLE_RATES']"
            )
        return rates[self.scope]

    def allow_request(self, request, view) -> bool:
        self.scope = self.scope_for(request, view)
        if not self.scope:
            return True
        self.rate = self.get_rate()
        self.num_requests, self.duration = self.parse_rate(self.rate)
        if self.rate is None:  # a scope explicitly set to None is unlimited
            return True
        return super().allow_request(request, view)

    def get_cache_key(self, request, view) -> str:
        token = getattr(view, "kwargs", {}).get("token")
        if self.scope == PARTICIPANT_WRITE and token:
            ident = "session-" + hashlib.sha256(str(token).encode()).hexdigest()[:40]
        elif request.user and request.user.is_authenticated:
            ident = f"user-{request.user.pk}"
        else:
            ident = "ip-" + hash_ip(client_ip(request))[:40]
        return self.cache_format % {"scope": self.scope, "ident": ident}
