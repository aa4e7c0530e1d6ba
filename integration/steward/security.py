"""Users, passwords, sessions, CSRF tokens, login throttling and API tokens of the steward workbench.

Passwords are hashed with Argon2id (argon2-cffi's ``PasswordHasher``, RFC 9106 parameters, a random salt per
password); hashes from before (scrypt, stdlib ``hashlib.scrypt``) are still verified and replaced by an Argon2id
hash at the user's next sign-in. The hash never leaves this module's callers' database rows. A session is a random token in an HttpOnly
cookie; the database keeps only its SHA-256, so a leaked table cannot be replayed as a cookie, and a
tampered cookie simply matches nothing. Each session has its own CSRF token, checked on every POST.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, delete, func, insert, select, update

from crm_core.models import Base
from crm_core.steward_models import (
    API_TOKENS,
    AUDIT,
    ROLES,
    SESSIONS,
    USERS,
    ApiToken,
    AuditEvent,
    StewardSession,
    StewardUser,
)
from integration.steward.audit import record_event
from integration.steward.errors import StewardError

TABLES = Base.metadata.tables

# Argon2id with argon2-cffi's defaults (RFC 9106 "low memory": t=3, 64 MiB, p=4): about 0.1 s a hash.
# Hashes made with other parameters (or older scrypt ones) are replaced at the next successful sign-in.
HASHER = PasswordHasher()
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # the parameters of hashes made before Argon2 (still verified)
IDLE_TIMEOUT = dt.timedelta(minutes=30)
TOUCH_EVERY = dt.timedelta(seconds=60)  # write last_seen_at at most this often per session
THROTTLE_WINDOW = dt.timedelta(minutes=15)
THROTTLE_FAILURES = 5  # failed logins for one name within the window before its sign-ins pause
# From one address (an office behind one NAT, or a proxy without --trust-forwarded-for, is one address).
THROTTLE_FAILURES_PER_ADDRESS = 20
RESERVED_NAMES = frozenset({"linkage"})  # automatic merges are decided by "linkage"
MIN_PASSWORD = 10
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
_TABLES = {StewardUser: USERS, StewardSession: SESSIONS, ApiToken: API_TOKENS, AuditEvent: AUDIT}


def utcnow() -> dt.datetime:
    """Now, in UTC."""
    return dt.datetime.now(dt.UTC)


def as_utc(stamp: dt.datetime) -> dt.datetime:
    """A stamp read back from the database as aware UTC (SQLite returns naive datetimes)."""
    return stamp.replace(tzinfo=dt.UTC) if stamp.tzinfo is None else stamp


def hash_password(password: str) -> str:
    """Return an Argon2id hash (PHC string ``$argon2id$v=19$m=…,t=…,p=…$salt$hash``) of ``password``."""
    return HASHER.hash(password)


def scrypt_hash(password: str) -> str:
    """Return ``scrypt$n$r$p$salt$hash`` for ``password``: the format before Argon2, kept for tests of the upgrade."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    encoded = (base64.b64encode(v).decode() for v in (salt, digest))
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'$'.join(encoded)}"


def _verify_scrypt(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


def verify_password(password: str, stored: str) -> bool:
    """Return whether ``password`` matches a stored hash: Argon2 (:func:`hash_password`) or the older scrypt."""
    if stored.startswith("scrypt$"):
        return _verify_scrypt(password, stored)
    try:
        return HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):  # a mismatch is a VerificationError
        return False


def needs_rehash(stored: str) -> bool:
    """Whether a stored hash should be replaced at the next sign-in (scrypt, or Argon2 with old parameters)."""
    if not stored.startswith("$argon2"):
        return True
    try:
        return HASHER.check_needs_rehash(stored)
    except InvalidHashError:
        return True


_DUMMY_HASH = hash_password(secrets.token_hex(16))  # an unknown name costs as much as a wrong password


def token_hash(token: str) -> str:
    """The SHA-256 (hex) under which a session or API token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_password_rules(password: str) -> None:
    """Refuse a password too short to resist guessing."""
    if len(password) < MIN_PASSWORD:
        raise StewardError(f"a password needs at least {MIN_PASSWORD} characters")


def check_name(name: str) -> str:
    """Return a user or token name stripped, or refuse an empty, overlong or reserved one."""
    name = name.strip()
    if not name or len(name) > 64 or any(c.isspace() or not c.isprintable() for c in name):
        raise StewardError("a name is 1 to 64 printable characters without spaces")
    if name.casefold() in RESERVED_NAMES:
        raise StewardError(f"'{name}' is reserved (automatic merges are decided by it); choose another name")
    return name


@dataclass(frozen=True)
class Principal:
    """The signed-in user of a request."""

    user_id: int
    name: str
    role: str
    session_id: int
    csrf_token: str
    skipped: tuple[int, ...] = ()

    def can(self, role: str) -> bool:
        """Whether this user has ``role`` or a higher one (viewer < steward < admin)."""
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


# --------------------------------------------------------------------------- users


def add_user(connection: Connection, name: str, role: str, password: str, *, actor: str | None) -> int:
    """Create a user; returns its id. Refuses a taken name, an unknown role, a short password."""
    name = check_name(name)
    if role not in ROLES:
        raise StewardError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
    check_password_rules(password)
    users = _TABLES[StewardUser]
    if connection.scalar(select(users.c.id).where(users.c.name == name)) is not None:
        raise StewardError(
            f"a user '{name}' already exists; `crmi steward users reset {name}` sets a password"
        )
    now = utcnow()
    user_id = connection.execute(
        insert(users).values(name=name, role=role, password_hash=hash_password(password), active=True,
                             created_at=now, password_changed_at=now).returning(users.c.id)
    ).scalar_one()  # fmt: skip
    record_event(
        connection, actor, "user_add", summary=f"added {role} '{name}'", after={"name": name, "role": role}
    )
    return int(user_id)


def _user_id(connection: Connection, name: str) -> int:
    users = _TABLES[StewardUser]
    found = connection.scalar(select(users.c.id).where(users.c.name == name))
    if found is None:
        raise StewardError(f"no user '{name}'; `crmi steward users list` shows them")
    return int(found)


def set_active(connection: Connection, name: str, active: bool, *, actor: str | None) -> None:
    """Disable a user (their sessions end at once) or enable them again."""
    user_id = _user_id(connection, name)
    users = _TABLES[StewardUser]
    connection.execute(update(users).where(users.c.id == user_id).values(active=active))
    if not active:
        connection.execute(
            delete(_TABLES[StewardSession]).where(_TABLES[StewardSession].c.user_id == user_id)
        )
    record_event(connection, actor, "user_enable" if active else "user_disable",
                 summary=f"{'enabled' if active else 'disabled'} '{name}'")  # fmt: skip


def reset_password(connection: Connection, name: str, password: str, *, actor: str | None) -> None:
    """Set a new password; the user's sessions end (they sign in again)."""
    check_password_rules(password)
    user_id = _user_id(connection, name)
    users = _TABLES[StewardUser]
    connection.execute(
        update(users).where(users.c.id == user_id).values(password_hash=hash_password(password),
                                                          password_changed_at=utcnow())
    )  # fmt: skip
    connection.execute(delete(_TABLES[StewardSession]).where(_TABLES[StewardSession].c.user_id == user_id))
    record_event(connection, actor, "user_reset", summary=f"new password for '{name}'")


def set_role(connection: Connection, name: str, role: str, *, actor: str | None) -> None:
    """Change a user's role."""
    if role not in ROLES:
        raise StewardError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
    user_id = _user_id(connection, name)
    users = _TABLES[StewardUser]
    before = connection.scalar(select(users.c.role).where(users.c.id == user_id))
    connection.execute(update(users).where(users.c.id == user_id).values(role=role))
    record_event(connection, actor, "user_role", summary=f"'{name}' is now {role}",
                 before={"role": before}, after={"role": role})  # fmt: skip


def list_users(connection: Connection) -> list[dict[str, Any]]:
    """Every user: name, role, active, created (never the password hash)."""
    users = _TABLES[StewardUser]
    rows = connection.execute(
        select(users.c.id, users.c.name, users.c.role, users.c.active, users.c.created_at).order_by(
            users.c.name
        )
    )
    return [dict(row._mapping) for row in rows]


# --------------------------------------------------------------------------- sessions


def failed_logins(connection: Connection, name: str, ip: str | None) -> tuple[int, int]:
    """Failed logins for this name, and from this address, within the throttle window."""
    audit = _TABLES[AuditEvent]
    recent = [audit.c.action == "login_failed", audit.c.at > utcnow() - THROTTLE_WINDOW]
    by_name = connection.scalar(select(func.count()).where(*recent, audit.c.actor == name[:64])) or 0
    by_ip = connection.scalar(select(func.count()).where(*recent, audit.c.ip == ip)) if ip else 0
    return int(by_name), int(by_ip or 0)


def login(connection: Connection, name: str, password: str, ip: str | None) -> str | None:
    """Check a name and password and open a session; returns the session token for the cookie, or None for a
    wrong name or password or a disabled user (audited: commit the transaction, then refuse).

    After :data:`THROTTLE_FAILURES` failures for a name (or :data:`THROTTLE_FAILURES_PER_ADDRESS` from an
    address) within the window, every attempt is refused (even a right password) until the window passed.
    """
    by_name, by_ip = failed_logins(connection, name, ip)
    if by_name >= THROTTLE_FAILURES or by_ip >= THROTTLE_FAILURES_PER_ADDRESS:
        minutes = int(THROTTLE_WINDOW.total_seconds() // 60)
        raise StewardError(f"too many failed sign-ins; wait {minutes} minutes and try again", status=429,
                           retry_after=int(THROTTLE_WINDOW.total_seconds()))  # fmt: skip
    users = _TABLES[StewardUser]
    row = connection.execute(
        select(users.c.id, users.c.password_hash, users.c.active).where(users.c.name == name)
    ).first()
    good = verify_password(password, row.password_hash if row else _DUMMY_HASH) and row is not None
    if not good or row is None or not row.active:
        record_event(connection, name[:64] or None, "login_failed", ip=ip,
                     summary="wrong name or password" if not good else "user disabled")  # fmt: skip
        return None
    if needs_rehash(row.password_hash):  # an scrypt (or weaker Argon2) hash becomes today's, sessions kept
        connection.execute(
            update(users).where(users.c.id == row.id).values(password_hash=hash_password(password))
        )
    token = secrets.token_urlsafe(32)
    now = utcnow()
    sessions = _TABLES[StewardSession]
    connection.execute(delete(sessions).where(sessions.c.last_seen_at < now - IDLE_TIMEOUT))  # long gone
    connection.execute(
        insert(_TABLES[StewardSession]).values(token_hash=token_hash(token), user_id=row.id, ip=ip,
                                               csrf_token=secrets.token_urlsafe(32), created_at=now,
                                               last_seen_at=now, skipped=[])
    )  # fmt: skip
    record_event(connection, name, "login", ip=ip)
    return token


def session_user(
    connection: Connection, token: str | None, *, now: dt.datetime | None = None
) -> Principal | None:
    """Return the user of a session cookie, or None (no cookie, unknown or idle-expired session, disabled user).

    An idle session is deleted; a live one has ``last_seen_at`` moved forward (at most once a minute).
    """
    if not token or len(token) > 200:
        return None
    now = now or utcnow()
    sessions, users = _TABLES[StewardSession], _TABLES[StewardUser]
    row = connection.execute(
        select(sessions.c.id, sessions.c.csrf_token, sessions.c.last_seen_at, sessions.c.skipped, users.c.id.label("user_id"),
               users.c.name, users.c.role, users.c.active)
        .join(users, users.c.id == sessions.c.user_id)
        .where(sessions.c.token_hash == token_hash(token))
    ).first()  # fmt: skip
    if row is None:
        return None
    seen = as_utc(row.last_seen_at)
    if not row.active or now - seen > IDLE_TIMEOUT:
        connection.execute(delete(sessions).where(sessions.c.id == row.id))
        return None
    if now - seen > TOUCH_EVERY:
        connection.execute(update(sessions).where(sessions.c.id == row.id).values(last_seen_at=now))
    return Principal(row.user_id, row.name, row.role, row.id, row.csrf_token, tuple(row.skipped or ()))


def logout(connection: Connection, principal: Principal, ip: str | None) -> None:
    """End a session."""
    connection.execute(
        delete(_TABLES[StewardSession]).where(_TABLES[StewardSession].c.id == principal.session_id)
    )
    record_event(connection, principal.name, "logout", ip=ip)


def remember_skip(connection: Connection, principal: Principal, candidate_id: int) -> None:
    """Note that this session skipped a pair, so "next" does not offer it again (the last 500 are kept)."""
    skipped = [*principal.skipped, candidate_id][-500:]
    sessions = _TABLES[StewardSession]
    connection.execute(update(sessions).where(sessions.c.id == principal.session_id).values(skipped=skipped))


def csrf_matches(principal: Principal, sent: str | None) -> bool:
    """Whether a request's CSRF token is the session's (constant-time)."""
    return bool(sent) and hmac.compare_digest(principal.csrf_token.encode(), str(sent).encode())


# --------------------------------------------------------------------------- API tokens


def add_token(connection: Connection, name: str, *, actor: str | None) -> str:
    """Create an API token for the duplicate-check API; returns it (shown once, stored as SHA-256)."""
    name = check_name(name)
    tokens = _TABLES[ApiToken]
    if connection.scalar(select(tokens.c.id).where(tokens.c.name == name)) is not None:
        raise StewardError(f"a token '{name}' already exists; revoke it or choose another name")
    token = "crmi_" + secrets.token_urlsafe(32)
    connection.execute(
        insert(tokens).values(name=name, token_hash=token_hash(token), active=True, created_by=actor,
                              created_at=utcnow())
    )  # fmt: skip
    record_event(connection, actor, "token_add", summary=f"API token '{name}'")
    return token


def revoke_token(connection: Connection, name: str, *, actor: str | None) -> None:
    """Revoke an API token: calls with it are refused from now on."""
    tokens = _TABLES[ApiToken]
    done = connection.execute(update(tokens).where(tokens.c.name == name).values(active=False))
    if not done.rowcount:
        raise StewardError(f"no API token '{name}'")
    record_event(connection, actor, "token_revoke", summary=f"API token '{name}'")


def api_token_name(connection: Connection, token: str | None) -> str | None:
    """Return the name of an active API token, or None."""
    if not token or len(token) > 200:
        return None
    tokens = _TABLES[ApiToken]
    found = connection.scalar(
        select(tokens.c.name).where(tokens.c.token_hash == token_hash(token), tokens.c.active.is_(True))
    )
    return None if found is None else str(found)
