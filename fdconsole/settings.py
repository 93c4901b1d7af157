"""Django settings for fdconsole. Everything a deployment changes comes from the environment."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dj_database_url

from fdconsole.env import env_bool, env_int, env_list, env_str, secret_key
from scheduler.connection import READ_TIMEOUT_S, client_options, url_with_client_options

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = secret_key(BASE_DIR / ".secret_key")
DEBUG = env_bool("FD_DEBUG", False)
ALLOWED_HOSTS = env_list("FD_ALLOWED_HOSTS", "127.0.0.1,localhost")

# Behind TLS (a proxy that terminates it and sets X-Forwarded-Proto): cookies only over HTTPS, HSTS
# for a year, plain HTTP redirected. `manage.py check --deploy` is clean with it (make test checks).
FD_HTTPS = env_bool("FD_HTTPS", False)
if FD_HTTPS:
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # a load balancer's health check may come over plain HTTP
    SECURE_HSTS_SECONDS = 365 * 24 * 3600
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    # The header only allows the domain's owner to submit it to the browsers' preload list.
    SECURE_HSTS_PRELOAD = True
    # Trusted because the proxy sets it: never expose the console itself with FD_HTTPS=1.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# The console's Redis: rq queues, the Channels layer, and every topic's scheduler keys.
FD_REDIS_URL = env_str("FD_REDIS_URL", "redis://127.0.0.1:6379/0")
# auto = cuda when torch sees a GPU, else cpu.
FD_DEVICE = env_str("FD_DEVICE", "auto")
# The model of topics created without one: tiny, smollm2, or an absolute path to a Hugging Face
# checkpoint directory or a .gguf file (gpu_worker.model_source).
FD_MODEL = env_str("FD_MODEL", "smollm2")
# The weights' and KV cache's dtype: float32, bfloat16 or float16; empty = float32 on cpu, bfloat16 on cuda.
FD_DTYPE = env_str("FD_DTYPE", "")
# The longest request (prompt plus generated tokens) the console accepts, whatever the model's context.
FD_MAX_MODEL_LEN = env_int("FD_MAX_MODEL_LEN", 2048)
# Request bodies larger than this get 413 before they are read whole (fdconsole/bounded_input.py); Django
# refuses the same when a view reads request.body.
FD_MAX_BODY_BYTES = env_int("FD_MAX_BODY_BYTES", 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = FD_MAX_BODY_BYTES
# Intra-op threads of a CPU node. Several nodes often share a machine; torch's default (one thread per
# core each) makes them spin against each other and slows decoding by an order of magnitude.
FD_TORCH_THREADS = env_int("FD_TORCH_THREADS", 1)
# Demos and failover tests: every node waits this long after each token it streams.
FD_TOKEN_DELAY_MS = env_int("FD_TOKEN_DELAY_MS", 0)
# Server-Sent Event streams (and whole OpenAI answers) one API token may hold open at once.
FD_MAX_STREAMS_PER_TOKEN = env_int("FD_MAX_STREAMS_PER_TOKEN", 32)
# The Redis hosts a topic may be pointed at (scheduler_host); empty = the host of FD_REDIS_URL only.
FD_TOPIC_REDIS_HOSTS = env_list("FD_TOPIC_REDIS_HOSTS", "")
# Requests that may wait in one topic at once, whatever its scheduler (local also bounds each node's
# queue by scheduler_max_size); beyond it a submission is a 429.
FD_MAX_WAITING_PER_TOPIC = env_int("FD_MAX_WAITING_PER_TOPIC", 10000)
# The memory of the embedded Redis that make run starts (redis-server's maxmemory: 0 is no limit). It
# never evicts: past it, writes fail instead of queued requests vanishing.
FD_EMBEDDED_REDIS_MAXMEMORY = env_str("FD_EMBEDDED_REDIS_MAXMEMORY", "1gb")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "channels",
    "django_rq",
    "fdconsole.topics",
    "fdconsole.nodes",
    "fdconsole.inference",
    "fdconsole.api",
    "fdconsole.dashboard",
    "fdconsole.cluster",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "fdconsole.database_unavailable.DatabaseUnavailableMiddleware",  # outermost: an outage is a 503
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "fdconsole.dashboard.rq_queues.NodeQueuesMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks: turns a lockout into its page
]

ROOT_URLCONF = "fdconsole.urls"
ASGI_APPLICATION = "fdconsole.asgi.application"
WSGI_APPLICATION = "fdconsole.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database connections. The console is served over ASGI (daphne runs fdconsole/asgi.py, which sets
# FD_ASGI), where Django advises against persistent connections: there CONN_MAX_AGE is 0, and on
# PostgreSQL connections come from psycopg's pool instead. Every other process (fdnode, fdcluster's
# reaper: long-lived and synchronous) keeps its connection between uses, checked before each reuse.
FD_ASGI = env_bool("FD_ASGI", False)
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"), conn_max_age=0 if FD_ASGI else 600,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (console, nodes) share the file: wait for locks instead of failing, and let
    # readers go on while one writes (WAL).
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;",
    }
elif FD_ASGI and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Sized above the threads that ask at once (Django's one for sync views, the streams' worker threads:
    # min(32, CPUs + 4)); psycopg's default of 4 made every view wait on the streams under load.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2, "max_size": env_int("FD_DB_POOL_MAX", 40), "timeout": 10}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/login/"
# Login throttling (django-axes, its attempts kept in the database that every console process shares):
# after FD_LOGIN_FAILURE_LIMIT failed logins for one user name from one address, that pair is refused
# (429, the login page saying why) for FD_LOGIN_LOCKOUT_MINUTES after its last attempt. Keyed on the
# pair, so that nobody can lock a user out from everywhere. The address is the connection's (daphne's
# REMOTE_ADDR): behind a proxy, the proxy's, which makes it a limit per user name.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("FD_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("FD_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "login.html"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"  # filled by collectstatic (make run does it)
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "fdconsole" / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "fdconsole.storage.StaticStorage"},
}

# The channel layer's clients give up on a Redis that does not answer, like every other
# (scheduler.connection.client_options). Its receive blocks in BZPOPMIN for up to 5 s
# (channels_redis's RedisChannelLayer.brpop_timeout), so its read timeout is that plus the usual one.
CHANNEL_LAYER_READ_TIMEOUT_S = 5 + READ_TIMEOUT_S
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": FD_REDIS_URL,
                              **client_options(FD_REDIS_URL, CHANNEL_LAYER_READ_TIMEOUT_S)}]},
    }
}

# django-rq shows the node queues at /rq/; jobs travel as JSON, never pickle. It takes its client's
# options from the URL alone: the timeouts travel in its query.
RQ_QUEUES = {"default": {"URL": url_with_client_options(FD_REDIS_URL),
                         "SERIALIZER": "rq.serializers.JSONSerializer"}}
RQ = {"DEFAULT_RESULT_TTL": 3600}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("FD_LOG_LEVEL", "INFO")},
    # django-axes: its failed logins and lockouts are warnings; its INFO lines are noise in every process.
    "loggers": {"django.request": {"level": "ERROR"}, "axes": {"level": "WARNING"}},
}
