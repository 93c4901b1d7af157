from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from fdconsole.api import views as api_views
from fdconsole.dashboard import views as dashboard_views

admin.site.site_header = "fdconsole administration"
admin.site.site_title = "fdconsole admin"
admin.site.index_title = "Topics, nodes, requests, users and API tokens (the live console: View site)"

urlpatterns = [
    path("", dashboard_views.home, name="home"),
    path("topics/<str:topic>/", dashboard_views.topic_page, name="topic"),
    path("topics/<str:topic>/config/", dashboard_views.topic_config, name="topic_config"),
    path("requests/", dashboard_views.request_list, name="requests"),
    path("requests/new/", dashboard_views.request_new, name="request_new"),
    # Request ids may hold any printable character, '/' included: the longer routes are matched first.
    path("requests/<path:request_id>/stream", dashboard_views.request_stream, name="request_stream"),
    # No trailing slash on stream and cancel: a detail URL always ends in '/', so an id ending in
    # '/cancel' still has its own page.
    path("requests/<path:request_id>/cancel", dashboard_views.request_cancel, name="request_cancel"),
    path("requests/<path:request_id>/", dashboard_views.request_detail, name="request_detail"),
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("rq/", include("django_rq.urls")),
    path("healthz", api_views.healthz, name="healthz"),
    path("metrics", include("fdconsole.observability.urls")),
    path("api/v1/", include("fdconsole.api.urls")),
    path("api/", include("fdconsole.openapi.urls")),  # openapi.json and docs: public
    path("v1/", include("fdconsole.openai_api.urls")),
]

handler404 = "fdconsole.dashboard.views.not_found"
handler500 = "fdconsole.dashboard.views.server_error"
