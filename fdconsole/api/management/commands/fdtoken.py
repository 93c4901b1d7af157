"""``manage.py fdtoken --user U``: create U if missing and print a new API token as the last line."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from fdconsole.api.models import ApiToken


class Command(BaseCommand):
    help = "Create user U if missing and print a new API token (the last line of the output)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--user", required=True, help="user name")
        parser.add_argument("--name", default="fdtoken", help="a label for the token")

    def handle(self, *args, **options) -> None:
        user, created = get_user_model().objects.get_or_create(username=options["user"])
        if created:
            user.set_unusable_password()
            user.save()
            self.stderr.write(f"created user {user.username} (no password; API use only)")
        _, plain = ApiToken.issue(user, options["name"])
        self.stdout.write(plain)
