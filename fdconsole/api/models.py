"""API tokens, stored hashed: the plain token is shown once, when it is made.

A token acts for its user, within its scopes (``submit``, ``read``, ``admin``: a token never does more
than its user may), until it expires or is revoked; revoking is one-way. ``rpm`` and
``max_in_flight`` bound what it submits (``fdconsole.api.limits``).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

TOKEN_PREFIX = "fd_"
SCOPES = ("submit", "read", "admin")
SCOPE_HELP = {"submit": "submit and cancel requests", "read": "read requests, streams, topics, nodes, models "
              "and metrics", "admin": "create and change topics (with the user's permissions)"}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def scope_list(scopes: Iterable[str] | str) -> str:
    """The stored form of ``scopes`` (names, or one comma-separated string): in ``SCOPES`` order.
    Raises ValueError naming an unknown or missing scope."""
    names = [s.strip() for s in (scopes.split(",") if isinstance(scopes, str) else scopes) if s.strip()]
    unknown = sorted(set(names) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {', '.join(map(repr, unknown))}: the scopes are {', '.join(SCOPES)}")
    if not names:
        raise ValueError(f"a token needs at least one scope of {', '.join(SCOPES)}")
    return ",".join(s for s in SCOPES if s in names)


class ApiToken(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, editable=False, help_text="The token's first characters.")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    scopes = models.CharField(max_length=32, default=",".join(SCOPES),
                              help_text="What the token may do, within its user's permissions: "
                              + "; ".join(f"{k}: {v}" for k, v in SCOPE_HELP.items()) + ".")
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Refused from then on; empty: never.")
    revoked = models.BooleanField(default=False, help_text="Refused from now on, for good: a revoked token "
                                  "cannot be restored (issue a new one).")
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    rpm = models.PositiveIntegerField(null=True, blank=True, verbose_name="requests per minute",
                                      help_text="Requests it may submit in any 60 seconds; empty: no limit.")
    max_in_flight = models.PositiveIntegerField(null=True, blank=True, help_text="Its requests that may be "
                                                "unfinished at once; empty: no limit.")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(s for s in self.scopes.split(",") if s)

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    def clean(self) -> None:
        try:
            self.scopes = scope_list(self.scopes)
        except ValueError as exc:
            raise ValidationError({"scopes": str(exc)}) from None

    def save(self, *args, **kwargs) -> None:
        """Revoking is one-way: a row revoked in the database stays revoked, whatever is saved over it."""
        if self.pk is not None and not self.revoked:
            self.revoked = ApiToken.objects.filter(pk=self.pk, revoked=True).exists()
        if self.revoked and self.revoked_at is None:
            self.revoked_at = timezone.now()
        super().save(*args, **kwargs)

    def revoke(self) -> None:
        ApiToken.objects.filter(pk=self.pk, revoked=False).update(revoked=True, revoked_at=timezone.now())
        self.refresh_from_db(fields=["revoked", "revoked_at"])

    @classmethod
    def issue(cls, user, name: str = "", scopes: Iterable[str] | str = SCOPES,
              expires_at: datetime | None = None, rpm: int | None = None,
              max_in_flight: int | None = None) -> tuple[ApiToken, str]:
        """Create a token for ``user``; returns the row and the plain token (not stored anywhere). Raises
        ValueError for unknown scopes or a limit below 1."""
        for field, value in (("rpm", rpm), ("max_in_flight", max_in_flight)):
            if value is not None and value < 1:
                raise ValueError(f"{field} must be at least 1 (or no limit), got {value}")
        plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = cls.objects.create(user=user, name=name, prefix=plain[:10], token_hash=hash_token(plain),
                                 scopes=scope_list(scopes), expires_at=expires_at, rpm=rpm,
                                 max_in_flight=max_in_flight)
        return row, plain

    @classmethod
    def find(cls, plain: str) -> ApiToken | None:
        """The token ``plain`` names, revoked, expired or not (its user loaded); None when none does."""
        return cls.objects.select_related("user").filter(token_hash=hash_token(plain)).first()

    def refusal(self) -> str | None:
        """Why this token is refused now (revoked, expired, its user deactivated), or None."""
        if self.revoked:
            return "this API token was revoked"
        if self.expired():
            return f"this API token expired at {self.expires_at.isoformat().replace('+00:00', 'Z')}"
        if not self.user.is_active:
            return "this API token's user is deactivated"
        return None

    def touch(self) -> None:
        """Records the use (at most once a minute: a write per call would be the API's cost)."""
        now = timezone.now()
        if self.last_used_at is None or (now - self.last_used_at).total_seconds() > 60:
            ApiToken.objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now

    @classmethod
    def authenticate(cls, plain: str):
        """The active user owning ``plain`` when the token is live (not revoked, not expired), or None."""
        row = cls.find(plain)
        if row is None or row.refusal() is not None:
            return None
        row.touch()
        return row.user
