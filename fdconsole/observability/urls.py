"""Included at ``metrics`` by ``fdconsole.urls``."""

from django.urls import path

from fdconsole.observability import views

urlpatterns = [path("", views.metrics, name="metrics")]
