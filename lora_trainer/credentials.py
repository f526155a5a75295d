"""API credentials: the WebUI's ``--api-auth user:pass[,user2:pass2]`` list as {user: password}.

Parsed here, in the core, so the WebUI backend (which reads the flag) and the REST API (which
checks requests against it) share one rule without either importing the other.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["parse_credentials"]


def parse_credentials(spec: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``"user:pass,user2:pass2"`` (the WebUI's ``--api-auth``) or a mapping -> {user: password}.

    None or empty -> None (no authentication). A malformed entry raises ValueError.
    """
    if not spec:
        return None
    if isinstance(spec, Mapping):
        return {str(user): str(password) for user, password in spec.items()}
    credentials = {}
    for entry in str(spec).split(","):
        user, sep, password = entry.strip().partition(":")
        if not sep or not user:
            raise ValueError("each --api-auth entry must be user:password")
        credentials[user] = password
    return credentials or None
