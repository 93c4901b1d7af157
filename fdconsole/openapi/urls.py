from django.urls import path

from fdconsole.openapi import views

urlpatterns = [
    path("openapi.json", views.openapi_json, name="openapi-schema"),
    path("docs", views.api_docs, name="api-docs"),
]
