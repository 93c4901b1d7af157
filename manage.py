#!/usr/bin/env python
"""Django's command-line utility for fdconsole."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fdconsole.settings")
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except KeyboardInterrupt:  # Ctrl-C before the command took over its signals: nothing to clean up
        sys.exit(130)


if __name__ == "__main__":
    main()
