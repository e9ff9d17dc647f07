"""``redact_uri``: the one rule for showing a URI without its secrets.

A camera URI may carry a password (``rtsp://user:secret@host/s``) or a token in its query
(``http://cam/mjpg?token=...``). Only the source that opens the camera keeps the URI as given;
everything that shows, logs, publishes or stores one (events, webhook bodies, MQTT status, the page,
the summary, stderr) passes it through here first.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

REDACTED = "***"
# Query parameter names that carry a secret (matched as whole words inside the name, any case).
SECRET_PARAMS = re.compile(r"(pass|pwd|token|secret|key|auth|sig|signature|credential|session|cookie|bearer)",
                           re.IGNORECASE)
_PATH_PARAM = re.compile(r";(?P<name>[^;=/?#]+)=(?P<value>[^;/?#]*)")
_AUTHORITY = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#]*)")


def redact_uri(uri: object) -> str:
    """``uri`` as text with the password of ``user:password@`` and the values of secret-looking query
    parameters replaced by ``***``; the user name and everything else stay (they say which camera).
    Anything that is not a URI (a path, a camera index, a memory source) is returned as text."""
    text = str(uri)
    if "://" not in text:
        return text
    match = _AUTHORITY.match(text)
    if match and "@" in match.group("authority"):
        userinfo, _, host = match.group("authority").rpartition("@")   # a password may hold an unescaped @
        user, sep, _password = userinfo.partition(":")
        shown = f"{user}:{REDACTED}" if sep else (REDACTED if _looks_secret_alone(user) else user)
        text = match.group("scheme") + shown + "@" + host + text[match.end():]
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    # the same secret-looking names in the query, the fragment (#token=...) and path parameters (;password=...)
    path = _PATH_PARAM.sub(lambda m: f";{m['name']}={REDACTED}" if SECRET_PARAMS.search(m["name"]) else m[0],
                           parts.path)
    query, fragment = _redacted_pairs(parts.query), _redacted_pairs(parts.fragment)
    if (path, query, fragment) == (parts.path, parts.query, parts.fragment):
        return text
    return urlunsplit(parts._replace(path=path, query=query, fragment=fragment))


def _redacted_pairs(text: str) -> str:
    """``a=1&token=x`` with the values of secret-looking names replaced; ``text`` itself when none is."""
    pairs = parse_qsl(text, keep_blank_values=True) if text else []
    if not any(SECRET_PARAMS.search(name) for name, _ in pairs):
        return text
    return "&".join(f"{quote(name, safe='')}={REDACTED if SECRET_PARAMS.search(name) else quote(value, safe='')}"
                    for name, value in pairs)


def _looks_secret_alone(user: str) -> bool:
    """``rtsp://TOKEN@host``: a userinfo without a colon is usually a name, but a long opaque one
    (an API key in the user field) is a secret."""
    return len(user) >= 20 and bool(re.fullmatch(r"[A-Za-z0-9_\-.~%+/=]+", user)) and any(c.isdigit() for c in user)
