"""``manage.py fdtoken --user U [--scope S]... [--expires-days D] [--rpm N] [--max-in-flight N]``: create
U if missing and print a new API token as the last line."""

from __future__ import annotations

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from fdconsole.api.models import SCOPE_HELP, SCOPES, ApiToken


class Command(BaseCommand):
    help = "Create user U if missing and print a new API token (the last line of the output)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--user", required=True, help="user name")
        parser.add_argument("--name", default="fdtoken", help="a label for the token")
        parser.add_argument("--scope", action="append", metavar="S",
                            help="what the token may do, repeatable or comma-separated: "
                            + "; ".join(f"{k} ({v})" for k, v in SCOPE_HELP.items())
                            + f" (default: {','.join(SCOPES)})")
        parser.add_argument("--expires-days", type=float, metavar="D", help="refused after D days (default: "
                            "never)")
        parser.add_argument("--rpm", type=int, metavar="N",
                            help="requests it may submit per minute (default: no limit)")
        parser.add_argument("--max-in-flight", type=int, metavar="N", help="its requests that may be "
                            "unfinished at once (default: no limit)")

    def handle(self, *args, **options) -> None:
        scopes = ",".join(options["scope"] or SCOPES)
        days = options["expires_days"]
        if days is not None and days <= 0:
            raise CommandError(f"--expires-days must be more than 0, got {days:g}")
        for flag, value in (("--rpm", options["rpm"]), ("--max-in-flight", options["max_in_flight"])):
            if value is not None and value < 1:
                raise CommandError(f"{flag} must be at least 1, got {value} (leave it out for no limit)")
        user, created = get_user_model().objects.get_or_create(username=options["user"])
        try:
            _, plain = ApiToken.issue(user, options["name"], scopes,
                                      expires_at=timezone.now() + timedelta(days=days) if days else None,
                                      rpm=options["rpm"], max_in_flight=options["max_in_flight"])
        except ValueError as exc:
            if created:
                user.delete()
            raise CommandError(f"--scope: {exc}") from None
        if created:
            user.set_unusable_password()
            user.save()
            self.stderr.write(f"created user {user.username} (no password; API use only)")
        self.stdout.write(plain)
