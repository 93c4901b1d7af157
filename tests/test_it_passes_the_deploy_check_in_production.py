"""With the production settings README documents (FD_DEBUG=0, a strong FD_SECRET_KEY, FD_ALLOWED_HOSTS,
FD_HTTPS=1), Django's deployment checklist (`manage.py check --deploy`) has nothing to say, and the
console behind a TLS proxy answers as that implies: plain HTTP redirected, HSTS for a year, cookies only
over HTTPS. Each runs the real settings module in a process of its own, configured by its environment."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
YEAR_S = 365 * 24 * 3600
# What the Makefile's check-deploy target (and README's Production part) sets.
PRODUCTION = {"FD_DEBUG": "0", "FD_HTTPS": "1", "FD_ALLOWED_HOSTS": "console.example.com",
              "DATABASE_URL": "postgres://fd@db.example.com/fd",
              "FD_REDIS_URL": "redis://:redis-password@redis.example.com:6379/0"}


def environment(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FD_", "DJANGO_", "DATABASE_URL"))}
    env.update(PRODUCTION, FD_SECRET_KEY=secrets.token_urlsafe(50), FD_LOG_LEVEL="WARNING")
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def deploy_check(**changes: str | None) -> subprocess.CompletedProcess:
    return manage("check", "--deploy", "--fail-level", "WARNING", env=environment(**changes))


def test_the_deploy_check_is_clean_with_the_documented_production_settings():
    done = deploy_check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout


def test_the_makefile_checks_the_same_settings_in_make_test():
    makefile = (ROOT / "Makefile").read_text()
    assert "check --deploy --fail-level WARNING" in makefile
    test_target = next(line for line in makefile.splitlines() if line.startswith("test:"))
    assert "check-deploy" in test_target.split()
    for name, value in PRODUCTION.items():
        assert f"{name}={value}" in makefile


@pytest.mark.parametrize(("changes", "warnings"), [
    pytest.param({"FD_HTTPS": "0"}, ["security.W004", "security.W008", "security.W012", "security.W016"],
                 id="without-https"),
    pytest.param({"FD_SECRET_KEY": "short"}, ["security.W009"], id="weak-secret-key"),
    pytest.param({"FD_DEBUG": "1"}, ["security.W018"], id="debug"),
])
def test_the_deploy_check_fails_on_what_production_must_not_have(changes, warnings):
    done = deploy_check(**changes)
    assert done.returncode != 0
    for warning in warnings:
        assert warning in done.stderr + done.stdout


PROBE = """
import json
from django.conf import settings
from django.test import Client

plain = Client().get("/login/")
secure = Client().get("/login/", headers={"X-Forwarded-Proto": "https"})
health = Client().get("/healthz")
print(json.dumps({
    "plain": [plain.status_code, plain.get("Location", "")],
    "secure": [secure.status_code, secure.get("Strict-Transport-Security", "")],
    "cookies": {name: bool(morsel["secure"]) for name, morsel in secure.cookies.items()},
    "healthz_redirected": health.status_code in (301, 302),
    "proxy_header": list(settings.SECURE_PROXY_SSL_HEADER or ()),
}))
"""


def probe(tmp_path: Path, **changes: str | None) -> dict:
    # The test client's host, and a database that is there (healthz asks it) instead of the example's.
    env = environment(FD_ALLOWED_HOSTS="testserver", DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
                      FD_REDIS_URL="redis://127.0.0.1:1/0", **changes)
    done = manage("shell", "-c", PROBE, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_behind_tls_plain_http_is_redirected_and_https_gets_hsts_and_secure_cookies(tmp_path):
    seen = probe(tmp_path)
    assert seen["plain"] == [301, "https://testserver/login/"]
    assert seen["secure"][0] == 200
    assert seen["secure"][1] == f"max-age={YEAR_S}; includeSubDomains; preload"
    assert seen["cookies"] == {"csrftoken": True}
    assert seen["proxy_header"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert not seen["healthz_redirected"]  # a load balancer's plain-HTTP health check still gets an answer


def test_without_fd_https_nothing_is_redirected_and_cookies_are_not_secure(tmp_path):
    seen = probe(tmp_path, FD_HTTPS="0")
    assert seen["plain"] == [200, ""]
    assert seen["secure"] == [200, ""]
    assert seen["cookies"] == {"csrftoken": False}
    assert seen["proxy_header"] == []
