"""Request fingerprints: salted IP and browser hashes, and the client address behind proxies.

Used by quality control (:mod:`studyapp.quality`: the same IP or browser under several
participants), the rate limits (:mod:`studyapp.throttling`: IP-keyed limits) and session
start (:mod:`studyapp.views`: the hashes stored on a new session).

IP addresses are never stored: :func:`hash_ip` keeps an HMAC-SHA256 of the address under a
secret salt (``PERCEPTLAB_IP_SALT``, else derived from ``SECRET_KEY``). The IPv4 space is
small, so anyone holding the salt can brute-force a hash: keep the salt as secret as the key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from .models import Session

BROWSER_ID_SESSION_KEY = "perceptlab_browser_id"


def _salt() -> bytes:
    salt = getattr(settings, "PERCEPTLAB_IP_SALT", None)
    if salt:
        return salt.encode()
    return hmac.new(
        settings.SECRET_KEY.encode(), b"perceptlab.quality.salt", hashlib.sha256
    ).digest()


def _keyed_hash(kind: str, value: str) -> str:
    return hmac.new(_salt(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def _parse_ip(text: str) -> str | None:
    """``text`` as a canonical IP address (ports and IPv6 brackets dropped), else ``None``."""
    text = text.strip()
    candidates = [text]
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        candidates.append(text[1 : text.index("]")])
    elif text.count(":") == 1:  # "203.0.113.7:51234"
        candidates.append(text.partition(":")[0])
    for candidate in candidates:
        try:
            return ipaddress.ip_address(candidate).compressed
        except ValueError:
            continue
    return None


def hash_ip(ip: str) -> str:
    """Salted SHA-256 (HMAC) of an IP address, 64 hex chars; ``""`` for an empty address.

    The address is canonicalised first, so ``::1`` and ``0:0::1`` hash alike.
    """
    if not ip or not ip.strip():
        return ""
    return _keyed_hash("ip", _parse_ip(ip) or ip.strip())


def client_ip(request: HttpRequest) -> str:
    """The client's address: ``REMOTE_ADDR``, or from ``X-Forwarded-For`` behind trusted proxies.

    With ``settings.PERCEPTLAB_TRUSTED_PROXIES = n > 0`` each of the ``n`` proxies appended the
    address it received the request from, so the client is the ``n``-th entry from the right;
    entries further left were sent by the client itself and are ignored. With ``n = 0`` (the
    default) the header is ignored: anyone can send it.
    """
    remote = request.META.get("REMOTE_ADDR", "") or ""
    n = int(getattr(settings, "PERCEPTLAB_TRUSTED_PROXIES", 0) or 0)
    if n > 0:
        hops = [h for h in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
        if hops:
            # Fewer hops than proxies: every entry was written by a trusted proxy.
            candidate = _parse_ip(hops[-n] if len(hops) >= n else hops[0])
            if candidate:
                return candidate
    return _parse_ip(remote) or remote


def browser_hash(user_agent: str, client_info: dict[str, Any] | None) -> str:
    """Salted SHA-256 of a browser: a per-browser random id, the user agent and the screen.

    ``client_info["browser_id"]`` is the random id that :func:`assign_request_fingerprints`
    keeps in the Django session cookie; without it the hash is ``""`` (unknown), because user
    agent and screen alone are shared by many people (one popular browser on a 1920×1080
    screen) and would flag strangers as the same browser.
    """
    info = client_info or {}
    browser_id = str(info.get("browser_id") or "")
    if not browser_id:
        return ""
    screen = f"{info.get('screen_width', '')}x{info.get('screen_height', '')}"
    dpr = info.get("device_pixel_ratio", "")
    return _keyed_hash("browser", f"{browser_id}|{user_agent.strip()}|{screen}|{dpr}")


def assign_request_fingerprints(session: Session, request: HttpRequest, *, save: bool = True):
    """Set ``session.ip_hash`` and ``session.browser_hash`` from the starting request.

    Call it when a session starts, with the request that started it. The browser id lives in
    the Django session (``request.session``), so the same browser taking the study under
    another worker id gets the same browser hash; nothing raw (address, id) is stored on the
    session. Saves the two fields unless ``save=False``.
    """
    session.ip_hash = hash_ip(client_ip(request))
    browser_id = ""
    django_session = getattr(request, "session", None)
    if django_session is not None:
        browser_id = django_session.get(BROWSER_ID_SESSION_KEY) or ""
        if not browser_id:
            browser_id = secrets.token_hex(16)
            django_session[BROWSER_ID_SESSION_KEY] = browser_id
    session.browser_hash = browser_hash(
        request.headers.get("User-Agent", ""),
        {**(session.client_info or {}), "browser_id": browser_id},
    )
    if save and session.pk is not None:
        session.save(update_fields=["ip_hash", "browser_hash"])
    return session
