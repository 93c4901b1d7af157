"""Who may see and cancel which request: its submitter, and whoever holds the permission for all.

Design note. A request belongs to the user whose token or session submitted it. Everyone else is told
it does not exist (404, the same answer as for an id nobody used), so that request ids leak nothing;
a user who may see every request (``inference.view_all_requests``) but not cancel every one
(``inference.cancel_all_requests``) is refused a cancel with 403 naming that permission. Superusers
hold every permission. The pages, the native API, its streams and the OpenAI API all ask here.
"""

from __future__ import annotations

from django.db.models import QuerySet

from fdconsole.errors import Forbidden, UnknownObject
from fdconsole.inference.models import Request
from fdconsole.inference.submit import get_request_row

VIEW_ALL = "inference.view_all_requests"
CANCEL_ALL = "inference.cancel_all_requests"


def may_view_all(user) -> bool:
    return bool(user is not None and user.is_active and user.has_perm(VIEW_ALL))


def may_cancel_all(user) -> bool:
    return bool(user is not None and user.is_active and user.has_perm(CANCEL_ALL))


def owns(user, row: Request) -> bool:
    return user is not None and user.is_authenticated and row.submitted_by_id == user.pk


def visible_requests(user) -> QuerySet[Request]:
    """The requests ``user`` may see."""
    rows = Request.objects.select_related("topic")
    if may_view_all(user):
        return rows
    if user is None or not user.is_authenticated:
        return rows.none()
    return rows.filter(submitted_by=user)


def may_view(user, row: Request) -> bool:
    return owns(user, row) or may_view_all(user)


def request_for(user, request_id: str) -> Request:
    """The request ``request_id`` when ``user`` may see it; ``UnknownObject`` (404) otherwise, as for an
    id that names no request."""
    row = get_request_row(request_id)
    if not may_view(user, row):
        raise UnknownObject(f"no request '{request_id}'", field="request_id")
    return row


def request_to_cancel(user, request_id: str) -> Request:
    """The request ``request_id`` when ``user`` may cancel it: 404 when they may not see it, 403 naming the
    permission when they may see it but not cancel it."""
    row = request_for(user, request_id)
    if not owns(user, row) and not may_cancel_all(user):
        raise Forbidden(f"cancelling another user's request needs the permission {CANCEL_ALL} (\"Can cancel "
                        "every user's requests\")", field="request_id")
    return row
