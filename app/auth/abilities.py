"""What a principal may do. A session holds every ability of its user's role; a personal access
token holds the abilities it was created with, never more than its user holds now."""

from __future__ import annotations

ABILITIES = (
    "projects:read",
    "projects:write",
    "runs:start",
    "runs:control",
    #: append events to a run (a run's own token holds it for its run)
    "runs:report",
    "git:commit",
    "git:push",
    "settings:read",
    "settings:write",
    #: change the account itself: profile, password, TOTP, personal access tokens (a login
    #: session holds it; give it to a token only to let a script manage the account)
    "account",
    "admin",
)


def abilities_for_role(role: str) -> frozenset[str]:
    if role == "admin":
        return frozenset(ABILITIES)
    return frozenset(a for a in ABILITIES if a != "admin")
