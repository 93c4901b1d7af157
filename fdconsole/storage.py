"""Static files: hashed, compressed names once ``collectstatic`` has run; plain names before that."""

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    """Tests and a first ``runserver`` come before any ``collectstatic`` (``make run`` does it): a file
    missing from STATIC_ROOT is then served under its plain name by WhiteNoise's finders instead of
    failing the page with ValueError."""

    manifest_strict = False

    def stored_name(self, name: str) -> str:
        try:
            return super().stored_name(name)
        except ValueError:
            return name
