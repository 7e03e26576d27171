"""Sessions and credentials: login, refresh rotation with reuse detection, personal access tokens,
and turning a presented credential into a `Principal`."""

from __future__ import annotations

import hmac
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import NamedTuple

import jwt
import redis
import sqlalchemy as sa
from flask import current_app

from app import context
from app.audit import service as audit
from app.auth import cache, throttle, tokens
from app.auth.abilities import ABILITIES, abilities_for_role
from app.auth.models import PersonalAccessToken, RefreshToken
from app.auth.passwords import hash_password, needs_rehash, verify_password
from app.auth.totp import accepted_step
from app.database import after_commit, as_loaded, db
from app.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from app.live import pubsub
from app.pagination import paginate
from app.queues import get_redis
from app.runs.models import RUN_ACTIVE, Run
from app.tasks.models import Task
from app.timeutil import as_utc, utcnow
from app.users.models import User

log = logging.getLogger(__name__)
#: last_used_at is written at most this often per token, so reads don't each cost a write
LAST_USED_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class Principal:
    user: User
    abilities: frozenset[str]
    #: "session" for a JWT, "pat" for a personal access token
    kind: str
    token_id: int | None = None
    family_id: str | None = None
    #: a run's token ("run"): the run, its task and project, the only ones it reaches
    run_id: int | None = None
    task_id: int | None = None
    project_id: int | None = None

    @property
    def via(self) -> str:
        if self.kind == "run":
            return f"run:{self.run_id}"
        return f"pat:{self.token_id}" if self.kind == "pat" else "session"

    def can(self, ability: str) -> bool:
        return ability in self.abilities

    def reaches(self, *, run_id: int | None = None, task_id: int | None = None) -> bool:
        """A run's token reaches its own run and task only; any other credential, whatever its
        roles allow (`projects.service.authorize` decides that)."""
        if self.run_id is None:
            return True
        return (run_id is None or run_id == self.run_id) and (
            task_id is None or task_id == self.task_id
        )


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "Bearer"


def _config(name: str) -> int:
    return int(current_app.config[f"SWITCHBOARD_{name}"])


def find_user(identifier: str) -> User | None:
    """The account a person names: by email when it has an `@`, else by username."""
    ident = identifier.strip().lower()
    column = User.email if "@" in ident else User.username
    return db.session.scalar(sa.select(User).where(column == ident))


def _issue(user: User, family_id: str) -> TokenPair:
    raw = tokens.new_opaque(tokens.REFRESH_PREFIX)
    db.session.add(
        RefreshToken(
            user_id=user.id,
            family_id=family_id,
            token_hash=tokens.digest(raw),
            expires_at=utcnow() + timedelta(seconds=_config("REFRESH_TOKEN_TTL")),
        )
    )
    ttl = _config("ACCESS_TOKEN_TTL")
    access = tokens.encode_access(current_app.config["SECRET_KEY"], user.id, family_id, ttl)
    return TokenPair(access_token=access, refresh_token=raw, expires_in=ttl)


def login(identifier: str, password: str, totp_code: str | None = None) -> TokenPair:
    """Never says whether the account exists: unknown, inactive and wrong password look alike."""
    ip = context.current().ip
    user = find_user(identifier)
    # one bucket per account, whether it is named by username or email (an unknown name: its own)
    account = f"user:{user.id}" if user else identifier.strip().lower()
    throttle.check(ip, account)
    password_ok = verify_password(user.password_hash if user else None, password)
    if user is None or not password_ok or not user.is_active:
        _login_failed(ip, account, user, "invalid_credentials")
        raise Unauthorized("Invalid username or password.", code="invalid_credentials")
    if user.totp_enabled and user.totp_secret:
        if not totp_code:
            raise Unauthorized("This account needs a TOTP code.", code="totp_required")
        step = accepted_step(user.totp_secret, totp_code, user.totp_last_step)
        if step is None:
            _login_failed(ip, account, user, "totp_invalid")
            raise Unauthorized("The TOTP code is wrong or was already used.", code="totp_invalid")
        user.totp_last_step = step
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    pair = _issue(user, uuid.uuid4().hex)
    audit.record("auth.login", actor_id=user.id, target_type="user", target_id=user.id)
    db.session.commit()
    return pair


def _login_failed(ip: str | None, account: str, user: User | None, reason: str) -> None:
    db.session.rollback()
    throttle.failed(ip, account)
    audit.record_now(
        "auth.login_failed",
        actor_id=user.id if user else None,
        actor_name=user.username if user else None,
        target_type="user" if user else None,
        target_id=user.id if user else None,
        # whether the account exists, never what was typed (people type passwords as names)
        payload={"account_exists": user is not None, "reason": reason},
    )


def _revoke_family(family_id: str, user_id: int, reason: str) -> None:
    db.session.execute(
        sa.update(RefreshToken)
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoke_reason=reason)
    )
    _logins_ended(user_id, [family_id])


def revoke_user_sessions(user_id: int, reason: str, keep_family: str | None = None) -> None:
    live = sa.and_(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
    if keep_family:
        live = sa.and_(live, RefreshToken.family_id != keep_family)
    families = list(db.session.scalars(sa.select(RefreshToken.family_id).where(live).distinct()))
    db.session.execute(
        sa.update(RefreshToken).where(live).values(revoked_at=utcnow(), revoke_reason=reason)
    )
    _logins_ended(user_id, families)


def _revoked_login_key(family_id: str) -> str:
    return f"{pubsub.namespace()}:revoked-login:{family_id}"


def _logins_ended(user_id: int, family_ids: list[str]) -> None:
    """The access tokens of these logins stop working too, not only their refresh tokens: once
    the transaction commits, each login is marked ended in Redis for as long as an access token
    of it can live, and every process forgets what it remembered of the user."""
    if not family_ids:
        return
    ttl = _config("ACCESS_TOKEN_TTL") + 5

    def mark() -> None:
        try:
            client = get_redis()
            pipe = client.pipeline(transaction=False)
            for family_id in family_ids:
                pipe.set(_revoked_login_key(family_id), "1", ex=ttl)
            pipe.execute()
        except redis.RedisError as exc:  # the access tokens then end with their expiry
            log.warning("could not mark %s logins ended: %s", len(family_ids), exc)

    after_commit(mark)
    cache.changed(user_id)  # announced after the mark (after-commit callbacks run in order)


def login_ended(family_id: str, user_id: int) -> bool:
    """Whether an access token's login was ended (logout, password change, refresh reuse).
    Remembered per process like the user (a change is announced), so a busy token costs one
    Redis read per few seconds, not one per request."""
    memory = cache.remembered()
    known = memory.get(("login", family_id))
    if known is None:
        try:
            known = (bool(get_redis().exists(_revoked_login_key(family_id))),)
        except redis.RedisError:
            return False  # Redis away: the access token's expiry bounds it
        memory.put(("login", family_id), user_id, known)
    return known[0]


def revoke_user_pats(user_id: int) -> None:
    cache.changed(user_id)
    db.session.execute(
        sa.update(PersonalAccessToken)
        .where(PersonalAccessToken.user_id == user_id, PersonalAccessToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def _find_refresh(raw: str) -> RefreshToken:
    row = db.session.scalar(
        sa.select(RefreshToken).where(RefreshToken.token_hash == tokens.digest(raw))
    )
    if row is None:
        throttle.failed(context.current().ip)
        raise Unauthorized("Unknown refresh token.", code="invalid_refresh_token")
    return row


def refresh(raw: str) -> TokenPair:
    """Rotate: the presented token is spent; presenting a spent token again revokes its family."""
    throttle.check(context.current().ip)
    row = _find_refresh(raw)
    now = utcnow()
    if row.revoked_at is not None:
        raise Unauthorized("This refresh token was revoked.", code="invalid_refresh_token")
    # Spend it atomically: of two concurrent refreshes with one token, only one wins.
    spent = db.session.execute(
        sa.update(RefreshToken)
        .where(
            RefreshToken.id == row.id,
            RefreshToken.rotated_at.is_(None),
            RefreshToken.revoked_at.is_(None),
        )
        .values(rotated_at=now)
    ).rowcount
    if spent != 1:
        _revoke_family(row.family_id, row.user_id, "reuse")
        audit.record(
            "auth.refresh_reuse",
            actor_id=row.user_id,
            target_type="session",
            target_id=row.family_id,
            payload={"family_id": row.family_id},
        )
        db.session.commit()
        raise Unauthorized(
            "This refresh token was already used; every session token of its login is revoked.",
            code="refresh_token_reused",
        )
    user = db.session.get(User, row.user_id)
    if as_utc(row.expires_at) <= now or user is None or not user.is_active:
        db.session.rollback()
        raise Unauthorized("This refresh token has expired.", code="invalid_refresh_token")
    pair = _issue(user, row.family_id)
    db.session.commit()
    return pair


def logout(raw: str) -> None:
    row = _find_refresh(raw)
    _revoke_family(row.family_id, row.user_id, "logout")
    audit.record(
        "auth.logout", actor_id=row.user_id, target_type="session", target_id=row.family_id
    )
    db.session.commit()


def authenticate(credential: str) -> Principal:
    """A bearer value (access JWT, `sbp_` or `sbr_` token) -> Principal, or Unauthorized."""
    if credential.startswith(tokens.PAT_PREFIX):
        return _authenticate_pat(credential)
    if credential.startswith(tokens.RUN_PREFIX):
        return _authenticate_run(credential)
    try:
        claims = tokens.decode_access(current_app.config["SECRET_KEY"], credential)
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("The access token has expired.", code="token_expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("The access token is not valid.", code="invalid_token") from exc
    user = _user(int(claims["sub"]))
    if user is None or not user.is_active:
        raise Unauthorized("The access token is not valid.", code="invalid_token")
    family = claims.get("fam")
    if family and login_ended(family, user.id):
        raise Unauthorized("This login has ended; log in again.", code="token_revoked")
    return Principal(
        user=user,
        abilities=abilities_for_role(user.role),
        kind="session",
        family_id=claims.get("fam"),
    )


def stream_token(principal: Principal, path: str) -> tuple[str, int]:
    """A token valid `STREAM_TOKEN_TTL` seconds for streams under `path`, with the caller's
    abilities (never more)."""
    if not path.startswith("/api/v1/") or ".." in path:
        raise ValidationFailed("Bad path.", {"path": ["a path under /api/v1/"]})
    ttl = _config("STREAM_TOKEN_TTL")
    token = tokens.encode_stream(
        current_app.config["SECRET_KEY"],
        principal.user.id,
        path,
        sorted(principal.abilities),
        ttl,
        pat_id=principal.token_id,
        family_id=principal.family_id,
    )
    return token, ttl


def under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, segment by segment: `/runs/18` is not under `/runs/1`."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def authenticate_stream(token: str, path: str) -> Principal:
    try:
        claims = tokens.decode_stream(current_app.config["SECRET_KEY"], token)
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("The stream token has expired.", code="token_expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("The stream token is not valid.", code="invalid_token") from exc
    if not under(path, claims["path"]):
        raise Unauthorized("The stream token is for another path.", code="invalid_token")
    if claims.get("pat") is not None:  # it ends with the token that asked for it
        pat = db.session.get(PersonalAccessToken, int(claims["pat"]))
        if pat is None or pat_refusal(pat.revoked_at is not None, pat.expires_at, utcnow()):
            raise Unauthorized(
                "The token that asked for this stream token has ended.", code="invalid_token"
            )
    user = _user(int(claims["sub"]))
    if user is None or not user.is_active:
        raise Unauthorized("The stream token is not valid.", code="invalid_token")
    family = claims.get("fam")
    if family and login_ended(family, user.id):
        raise Unauthorized(
            "The login that asked for this stream token has ended.", code="token_revoked"
        )
    return Principal(
        user=user,
        kind="stream",
        abilities=frozenset(claims.get("abl", [])) & abilities_for_role(user.role),
        token_id=int(claims["pat"]) if claims.get("pat") is not None else None,
        family_id=family,
    )


def reconfirm(principal: Principal) -> Principal:
    """`principal` again, for a stream that has been open a while when a change that concerns
    its user was announced: the user still active, the login or token it came from still live
    (an access or stream token's own expiry does not end a stream it opened), its abilities as
    the user's role gives them now. Unauthorized otherwise."""
    user = db.session.get(User, principal.user.id, populate_existing=True)
    if user is None or not user.is_active:
        raise Unauthorized("The account is no longer active.", code="invalid_token")
    if principal.family_id and login_ended(principal.family_id, user.id):
        raise Unauthorized("This login has ended; log in again.", code="token_revoked")
    role_gives = abilities_for_role(user.role)
    if principal.token_id is not None:
        pat = db.session.get(PersonalAccessToken, principal.token_id, populate_existing=True)
        if pat is None:
            raise _invalid_pat()
        refused = pat_refusal(pat.revoked_at is not None, pat.expires_at, utcnow())
        if refused is not None:
            raise refused
        role_gives &= pat_abilities(user.role, list(pat.abilities))
    return replace(principal, user=user, abilities=principal.abilities & role_gives)


class _Pat(NamedTuple):
    """What deciding on a personal access token needs of its row (remembered by digest)."""

    id: int
    user_id: int
    abilities: tuple[str, ...]
    revoked: bool
    expires_at: datetime | None
    last_used_at: datetime | None


def _authenticate_pat(raw: str) -> Principal:
    digest = tokens.digest(raw)
    memory = cache.remembered()
    pat = memory.get(("pat", digest))
    if pat is None:
        row = db.session.scalar(
            sa.select(PersonalAccessToken).where(PersonalAccessToken.token_hash == digest)
        )
        if row is None:
            raise _invalid_pat()
        pat = _Pat(
            row.id,
            row.user_id,
            tuple(row.abilities),
            row.revoked_at is not None,
            row.expires_at,
            row.last_used_at,
        )
    now = utcnow()
    refused = pat_refusal(pat.revoked, pat.expires_at, now)
    if refused is not None:
        raise refused
    user = _user(pat.user_id)
    if user is None or not user.is_active:
        raise _invalid_pat()
    if pat_touch_due(pat.last_used_at, now):
        db.session.execute(
            sa.update(PersonalAccessToken)
            .where(PersonalAccessToken.id == pat.id)
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        db.session.commit()
        pat = pat._replace(last_used_at=now)
    memory.put(("pat", digest), pat.user_id, pat)
    return Principal(
        user=user,
        abilities=pat_abilities(user.role, list(pat.abilities)),
        kind="pat",
        token_id=pat.id,
    )


#: what a run's token may do, in its own run's project only (`Principal.reaches`)
RUN_ABILITIES = frozenset({"projects:read", "runs:report"})


def _authenticate_run(raw: str) -> Principal:
    """A run's token: valid while its run is active (the agent holds it), for that run only."""
    run_id = tokens.run_token_id(raw)
    row = None
    if run_id is not None:
        row = db.session.execute(
            sa.select(Run.status, Run.token_hash, Run.task_id, Run.project_id, Task.creator_id)
            .join(Task, Task.id == Run.task_id)
            .where(Run.id == run_id)
        ).first()
    if (
        row is None
        or row.token_hash is None
        or not hmac.compare_digest(row.token_hash, tokens.digest(raw))
    ):
        raise Unauthorized("The run token is not valid.", code="invalid_token")
    if row.status not in RUN_ACTIVE:
        raise Unauthorized("The run has ended, and its token with it.", code="token_expired")
    user = _user(row.creator_id) if row.creator_id is not None else None
    if user is None:  # the task's creator is gone (or it came from a webhook): act as no one
        user = User(username=f"run-{run_id}", role="member", is_active=True)
    return Principal(
        user=user,
        abilities=RUN_ABILITIES,
        kind="run",
        run_id=run_id,
        task_id=row.task_id,
        project_id=row.project_id,
    )


def _user(user_id: int) -> User | None:
    """The user, from this process's memory when it holds them (built as if loaded: no query),
    else from the database."""
    memory = cache.remembered()
    fields = memory.get(("user", user_id))
    if fields is not None:
        return as_loaded(db.session(), User, fields)
    user = db.session.get(User, user_id)
    if user is not None:
        columns = {c.key: getattr(user, c.key) for c in User.__mapper__.column_attrs}
        memory.put(("user", user_id), user_id, columns)
    return user


# The decision on a personal access token, on values: `_authenticate_pat` applies it to the
# rows it loaded, the task fast path (`tasks.pg_fastpath`) to the row it read.


def _invalid_pat() -> Unauthorized:
    return Unauthorized("The token is not valid or was revoked.", code="invalid_token")


def pat_refusal(revoked: bool, expires_at: datetime | None, now: datetime) -> Unauthorized | None:
    """Why the token cannot be used now, if it cannot."""
    if revoked:
        return _invalid_pat()
    if expires_at is not None and as_utc(expires_at) <= now:
        return Unauthorized("The token has expired.", code="token_expired")
    return None


def pat_touch_due(last_used_at: datetime | None, now: datetime) -> bool:
    """Whether this use is written as the token's `last_used_at` (at most once a resolution)."""
    return last_used_at is None or now - as_utc(last_used_at) > LAST_USED_RESOLUTION


def pat_abilities(user_role: str, token_abilities: list[str] | None) -> frozenset[str]:
    """A token holds what it was created with, never more than its user's role holds now."""
    return frozenset(token_abilities or ()) & abilities_for_role(user_role)


def create_pat(
    principal: Principal, label: str, abilities: list[str], expires_at: datetime | None
) -> tuple[PersonalAccessToken, str]:
    unknown = sorted(set(abilities) - set(ABILITIES))
    if unknown:
        raise ValidationFailed(
            "Unknown abilities.", {"abilities": [f"unknown ability: {a}" for a in unknown]}
        )
    beyond = sorted(set(abilities) - principal.abilities)
    if beyond:
        raise Forbidden(
            "A token cannot hold abilities its creator does not hold: " + ", ".join(beyond)
        )
    if expires_at is not None and as_utc(expires_at) <= utcnow():
        raise ValidationFailed("Expiry is in the past.", {"expires_at": ["must be in the future"]})
    parent = db.session.get(PersonalAccessToken, principal.token_id) if principal.token_id else None
    parent_ends = as_utc(parent.expires_at) if parent and parent.expires_at else None
    if parent_ends is not None and (expires_at is None or as_utc(expires_at) > parent_ends):
        raise ValidationFailed(
            "A token made by a token expires no later than it.",
            {"expires_at": [f"at the latest {parent_ends.isoformat()}"]},
        )
    raw = tokens.new_opaque(tokens.PAT_PREFIX)
    pat = PersonalAccessToken(
        user_id=principal.user.id,
        label=label,
        prefix=raw[:10],
        token_hash=tokens.digest(raw),
        abilities=sorted(set(abilities), key=ABILITIES.index),
        expires_at=expires_at,
        parent_id=parent.id if parent is not None else None,
    )
    db.session.add(pat)
    db.session.flush()
    audit.record(
        "token.create",
        target_type="token",
        target_id=pat.id,
        payload={
            "label": label,
            "abilities": pat.abilities,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    db.session.commit()
    return pat, raw


def list_pats(user_id: int, *, cursor: int | None, limit: int):  # type: ignore[no-untyped-def]
    stmt = sa.select(PersonalAccessToken).where(PersonalAccessToken.user_id == user_id)
    return paginate(stmt, PersonalAccessToken.id, cursor=cursor, limit=limit)


def get_pat(user_id: int, token_id: int) -> PersonalAccessToken:
    pat = db.session.get(PersonalAccessToken, token_id)
    if pat is None or pat.user_id != user_id:
        raise NotFound(f"No token {token_id}.")
    return pat


def revoke_pat(user_id: int, token_id: int) -> None:
    """Revoke a token and every token it minted, and theirs."""
    pat = get_pat(user_id, token_id)
    now, found, revoked = utcnow(), [pat], []
    while found:
        for token in found:
            if token.revoked_at is None:
                token.revoked_at = now
                revoked.append(token)
        found = list(
            db.session.scalars(
                sa.select(PersonalAccessToken).where(
                    PersonalAccessToken.parent_id.in_([t.id for t in found]),
                    PersonalAccessToken.user_id == user_id,
                )
            )
        )
    if revoked:
        cache.changed(user_id)
        for token in revoked:
            audit.record(
                "token.revoke",
                target_type="token",
                target_id=token.id,
                payload={"label": token.label, **({"with": pat.id} if token is not pat else {})},
            )
        db.session.commit()
