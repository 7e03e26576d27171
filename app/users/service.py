"""Accounts: creation, profile, password, TOTP and administration."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app import context
from app.audit import service as audit
from app.auth import cache as auth_cache
from app.auth import service as auth
from app.auth import throttle, totp
from app.auth.passwords import MAX_LENGTH, MIN_LENGTH, hash_password, verify_password
from app.database import db, lock_rows
from app.errors import Conflict, DomainError, Forbidden, NotFound, ValidationFailed
from app.pagination import Page, paginate
from app.users.models import ROLES, User

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class TotpInvalid(DomainError):
    status, code = 422, "totp_invalid"


def _check_password(password: str, field: str = "password") -> None:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise ValidationFailed(
            "The password is too short or too long.",
            {field: [f"must be {MIN_LENGTH} to {MAX_LENGTH} characters"]},
        )


def _unique(column: Any, value: str | None, label: str, exclude_id: int | None = None) -> None:
    if value is None:
        return
    stmt = sa.select(User.id).where(column == value)
    if exclude_id is not None:
        stmt = stmt.where(User.id != exclude_id)
    if db.session.scalar(stmt) is not None:
        raise Conflict(f"A user with this {label} already exists.", errors={label: ["taken"]})


def _norm_email(email: str | None) -> str | None:
    return email.strip().lower() if email else None


def current_user(user_id: int) -> User:
    """The user as the database holds it now, for a change made on their own account (what a
    request's credential carries may be a few seconds old: `auth.cache`)."""
    user = db.session.get(User, user_id, populate_existing=True)
    if user is None:
        raise NotFound(f"No user {user_id}.")
    return user


def get_user(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        raise NotFound(f"No user {user_id}.")
    return user


def create_user(
    username: str,
    password: str,
    *,
    email: str | None = None,
    role: str = "member",
    git_name: str | None = None,
    git_email: str | None = None,
) -> User:
    username = username.strip().lower()
    if not USERNAME_RE.match(username):
        raise ValidationFailed(
            "Invalid username.",
            {"username": ["1-64 characters: letters, digits, '.', '_' or '-', not first"]},
        )
    if role not in ROLES:
        raise ValidationFailed("Unknown role.", {"role": [f"one of {', '.join(ROLES)}"]})
    _check_password(password)
    email = _norm_email(email)
    _unique(User.username, username, "username")
    _unique(User.email, email, "email")
    user = User(
        username=username,
        email=email,
        password_hash=hash_password(password),
        role=role,
        git_name=git_name,
        git_email=git_email,
    )
    db.session.add(user)
    _flush_unique(
        lambda: (_unique(User.username, username, "username"), _unique(User.email, email, "email"))
    )
    audit.record(
        "user.create",
        target_type="user",
        target_id=user.id,
        payload={"username": username, "email": email, "role": role},
    )
    db.session.commit()
    return user


def list_users(
    *,
    role: str | None = None,
    active: bool | None = None,
    q: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page[User]:
    stmt = sa.select(User)
    if role:
        stmt = stmt.where(User.role == role)
    if active is not None:
        stmt = stmt.where(User.is_active == active)
    if q:
        like = f"%{q.strip().lower()}%"
        stmt = stmt.where(sa.or_(User.username.like(like), User.email.like(like)))
    return paginate(stmt, User.id, cursor=cursor, limit=limit, newest_first=False)


def _flush_unique(recheck: Callable[[], object]) -> None:
    """Flush; a username or email taken by a request that committed meanwhile (the unique
    index saw it, our check before did not) is the same 409 as one taken before."""
    try:
        db.session.flush()
    except sa.exc.IntegrityError:
        db.session.rollback()
        recheck()  # raises the 409 naming the field
        raise


def _active_admins_other_than(user_id: int) -> int:
    """Counted with the admins' rows locked (PostgreSQL; SQLite: the write lock), so that two
    admins demoting each other at once cannot both see the other remain."""
    lock_rows(User.id, User.role == "admin", User.is_active.is_(True))
    return (
        db.session.scalar(
            sa.select(sa.func.count(User.id)).where(
                User.role == "admin", User.is_active.is_(True), User.id != user_id
            )
        )
        or 0
    )


def update_user(user_id: int, changes: dict[str, Any]) -> User:
    """Admin update. Deactivation ends every session and token of the user at once."""
    user = get_user(user_id)
    before = {k: getattr(user, "is_active" if k == "active" else k) for k in changes}
    demoting = changes.get("role", user.role) != "admin" or changes.get("active") is False
    if user.is_admin and user.is_active and demoting and _active_admins_other_than(user.id) == 0:
        raise Conflict("This is the last active administrator; promote another one first.")
    if "role" in changes and changes["role"] not in ROLES:
        raise ValidationFailed("Unknown role.", {"role": [f"one of {', '.join(ROLES)}"]})
    if "email" in changes:
        changes["email"] = _norm_email(changes["email"])
        _unique(User.email, changes["email"], "email", exclude_id=user.id)
    for key, value in changes.items():
        setattr(user, "is_active" if key == "active" else key, value)
    if "email" in changes:
        _flush_unique(lambda: _unique(User.email, changes["email"], "email", exclude_id=user_id))
    if changes.get("active") is False and before.get("active") is not False:
        auth.revoke_user_sessions(user.id, "deactivated")
        auth.revoke_user_pats(user.id)
    audit.record(
        "user.update",
        target_type="user",
        target_id=user.id,
        payload={
            "changes": {
                k: {"from": before[k], "to": v} for k, v in changes.items() if before[k] != v
            }
        },
    )
    auth_cache.changed(user.id)
    db.session.commit()
    return user


def update_profile(user: User, changes: dict[str, Any]) -> User:
    user_id = user.id
    if "email" in changes:
        changes["email"] = _norm_email(changes["email"])
        _unique(User.email, changes["email"], "email", exclude_id=user_id)
    for key, value in changes.items():
        setattr(user, key, value)
    if "email" in changes:
        _flush_unique(lambda: _unique(User.email, changes["email"], "email", exclude_id=user_id))
    audit.record(
        "user.profile_update",
        target_type="user",
        target_id=user.id,
        payload={"fields": sorted(changes)},
    )
    auth_cache.changed(user.id)
    db.session.commit()
    return user


def change_password(user: User, current: str, new: str, keep_family: str | None) -> None:
    """Needs the current password; every other login of the user ends."""
    if not verify_password(user.password_hash, current):
        audit.record_now("user.password_change_failed", target_type="user", target_id=user.id)
        raise Forbidden("The current password is wrong.")
    _check_password(new, "new_password")
    user.password_hash = hash_password(new)
    auth.revoke_user_sessions(user.id, "password_changed", keep_family=keep_family)
    audit.record("user.password_change", target_type="user", target_id=user.id)
    auth_cache.changed(user.id)
    db.session.commit()


def totp_setup(user: User) -> tuple[str, str]:
    """Start enrolment: a fresh secret, active only once a code from it is verified."""
    if user.totp_enabled:
        raise Conflict("TOTP is already enabled; disable it first.")
    secret = totp.new_secret()
    user.totp_secret = secret
    user.totp_last_step = None
    audit.record("user.totp_setup", target_type="user", target_id=user.id)
    auth_cache.changed(user.id)
    db.session.commit()
    account = user.email or user.username
    return secret, totp.provisioning_uri(
        secret, account, current_app.config["SWITCHBOARD_TOTP_ISSUER"]
    )


def _accept(user: User, code: str) -> None:
    """A TOTP code for a change of the account; wrong ones count as failed authentications of
    the account and the client (six digits are guessed otherwise, on the API)."""
    if not user.totp_secret:
        raise Conflict("Set up TOTP first (POST /api/v1/me/totp/setup).")
    ip, account = context.current().ip, f"user:{user.id}"
    throttle.check(ip, account)
    step = totp.accepted_step(user.totp_secret, code, user.totp_last_step)
    if step is None:
        db.session.rollback()
        throttle.failed(ip, account)
        raise TotpInvalid("The code is wrong or was already used.", errors={"code": ["invalid"]})
    user.totp_last_step = step


def totp_verify(user: User, code: str) -> None:
    if user.totp_enabled:
        raise Conflict("TOTP is already enabled.")
    _accept(user, code)
    user.totp_enabled = True
    audit.record("user.totp_enable", target_type="user", target_id=user.id)
    auth_cache.changed(user.id)
    db.session.commit()


def totp_disable(user: User, code: str) -> None:
    if not user.totp_enabled:
        raise Conflict("TOTP is not enabled.")
    _accept(user, code)
    user.totp_enabled, user.totp_secret, user.totp_last_step = False, None, None
    audit.record("user.totp_disable", target_type="user", target_id=user.id)
    auth_cache.changed(user.id)
    db.session.commit()


def reset_totp(user_id: int) -> User:
    user = get_user(user_id)
    user.totp_enabled, user.totp_secret, user.totp_last_step = False, None, None
    audit.record("user.totp_reset", target_type="user", target_id=user.id)
    auth_cache.changed(user.id)
    db.session.commit()
    return user


class AdminPasswordMissing(Exception):
    """No admin exists, no password was given, and none may be generated (production)."""


def ensure_admin(
    username: str | None,
    password: str | None,
    email: str | None = None,
    *,
    may_generate: bool = True,
) -> tuple[User, str | None] | None:
    """First start: create an admin when none exists. Returns it and any generated password.
    A generated password must be shown to someone, which a production release log must not do:
    there `may_generate` is False and a missing password raises `AdminPasswordMissing`."""
    exists = db.session.scalar(sa.select(User.id).where(User.role == "admin").limit(1))
    if exists is not None:
        return None
    generated = None
    if not password:
        if not may_generate:
            raise AdminPasswordMissing
        generated = password = secrets.token_urlsafe(18)
    user = create_user(username or "admin", password, email=email, role="admin")
    return user, generated
