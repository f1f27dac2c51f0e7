from __future__ import annotations

from django.urls import path

from tests.django_project import views

urlpatterns = [
    path("pay", views.pay),
    path("health", views.health),
]
