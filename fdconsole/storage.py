"""Static files: hashed names when ``collectstatic`` has run, plain names (no error) when it has not."""

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticStorage(CompressedManifestStaticFilesStorage):
    # Tests and a first `manage.py runserver` run before collectstatic; fall back to the plain name.
    manifest_strict = False
