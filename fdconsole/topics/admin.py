"""Topics in the admin, changed through ``fdconsole.topics.services`` like everywhere else: a refused
change shows beside its field, and when the topic's Redis does not take the configuration nothing is
saved."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.http import HttpResponseRedirect

from fdconsole.topics.models import MODEL_HELP, Topic, checked_model
from fdconsole.topics.services import change_topic, check_change, create_topic
from scheduler.config import PARAMETERS, PASSWORD_MASK
from scheduler.errors import FdError


class TopicForm(forms.ModelForm):
    """The password is never shown back: the field starts empty, and empty keeps the current one. The
    model is checked as everywhere (``checked_model``); left empty it stays (a new topic: FD_MODEL)."""

    model = forms.CharField(required=False, max_length=Topic._meta.get_field("model").max_length,
                            widget=forms.TextInput(attrs={"class": "vLargeTextField"}),
                            help_text=f"{MODEL_HELP} Leave empty to keep the current one.")
    scheduler_password = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                                         help_text="Leave empty to keep the current password.")
    user = None  # who edits (set by TopicAdmin.get_form): the service checks what they may change

    class Meta:
        model = Topic
        fields = "__all__"

    def clean_scheduler_password(self) -> str:
        entered = self.cleaned_data.get("scheduler_password", "")
        return entered or (self.instance.scheduler_password if self.instance.pk else "")

    def clean_model(self) -> str:
        entered = self.cleaned_data.get("model", "").strip()
        if self.instance.pk and entered in ("", self.instance.model):
            return self.instance.model  # no change: not checked again (it is what the topic serves)
        try:
            return checked_model(entered or settings.FD_MODEL)
        except FdError as exc:
            raise ValidationError(exc.message) from None

    def _post_clean(self) -> None:
        super()._post_clean()  # the model's own validation of the row as edited
        if self.errors or self.instance.pk is None:
            return
        try:
            check_change(Topic.objects.get(pk=self.instance.pk), self.instance.config, self.user,
                         model=self.instance.model)
        except FdError as exc:
            self.add_error(exc.field if exc.field in self.fields else None, exc.message)


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    form = TopicForm
    list_display = ("name", "model", "scheduler_name", "scheduler_max_size", "scheduler_ttl", "node_count",
                    "updated_at")
    list_filter = ("scheduler_name",)
    search_fields = ("name",)
    readonly_fields = ("created_at", "updated_at", "password_masked")
    fieldsets = (
        (None, {"fields": ("name", "created_at", "updated_at")}),
        ("Model", {"fields": ("model",)}),
        ("Scheduler", {"fields": tuple(p.name for p in PARAMETERS)}),
    )

    def get_readonly_fields(self, request, obj=None):
        # Keys in Redis and rows of in-flight requests hang off the name: it cannot change.
        return (*self.readonly_fields, "name") if obj else self.readonly_fields

    def get_fieldsets(self, request, obj=None):
        if obj is None or self.has_change_permission(request, obj):
            return self.fieldsets
        # Shown read-only, every field is printed as it is: the password only masked.
        masked = tuple("password_masked" if p.name == "scheduler_password" else p.name for p in PARAMETERS)
        return (*self.fieldsets[:2], ("Scheduler", {"fields": masked}))

    @admin.display(description="scheduler password")
    def password_masked(self, topic: Topic) -> str:
        return PASSWORD_MASK if topic.scheduler_password else ""

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        return type(form.__name__, (form,), {"user": request.user})

    @admin.display(description="nodes")
    def node_count(self, obj: Topic) -> int:
        return obj.nodes.count()

    def save_model(self, request, obj: Topic, form, change: bool) -> None:
        config = {"model": obj.model, **{p.name: getattr(obj, p.name) for p in PARAMETERS}}
        saved = (change_topic(obj, config, user=request.user) if change
                 else create_topic(obj.name, config, user=request.user))
        obj.pk, obj.created_at, obj.updated_at = saved.pk, saved.created_at, saved.updated_at

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        # The admin saves in a transaction: a refusal at saving time (the topic's Redis does not take
        # the configuration; the topic got busy, or its name taken, since the form was checked) rolls
        # it back, and the page says why.
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except FdError as exc:
            self.message_user(request, f"Nothing was saved: {exc.message}", messages.ERROR)
        except IntegrityError:
            self.message_user(request, "Nothing was saved: a topic of that name was created meanwhile",
                              messages.ERROR)
        return HttpResponseRedirect(request.get_full_path())
