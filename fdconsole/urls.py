from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from fdconsole.api import views as api_views
from fdconsole.dashboard import views as dashboard_views

urlpatterns = [
    path("", dashboard_views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(template_name="login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("rq/", include("django_rq.urls")),
    path("healthz", api_views.healthz, name="healthz"),
    path("api/v1/", include("fdconsole.api.urls")),
]

handler404 = "fdconsole.dashboard.views.not_found"
handler500 = "fdconsole.dashboard.views.server_error"
