from django import forms
from django.contrib import admin, messages

from fdconsole.redis_conn import TopicRedisUnavailable, topic_redis_errors
from fdconsole.topics.models import Topic
from fdconsole.topics.services import publish_topic
from scheduler.config import PARAMETERS


class TopicForm(forms.ModelForm):
    """The password is never shown back: the field starts empty, and empty keeps the current one."""

    scheduler_password = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False),
                                         help_text="Leave empty to keep the current password.")

    class Meta:
        model = Topic
        fields = "__all__"

    def clean_scheduler_password(self) -> str:
        entered = self.cleaned_data.get("scheduler_password", "")
        return entered or (self.instance.scheduler_password if self.instance.pk else "")


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    form = TopicForm
    list_display = ("name", "scheduler_name", "scheduler_max_size", "scheduler_ttl", "node_count",
                    "updated_at")
    list_filter = ("scheduler_name",)
    search_fields = ("name",)
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "created_at", "updated_at")}),
        ("Scheduler", {"fields": tuple(p.name for p in PARAMETERS)}),
    )

    def get_readonly_fields(self, request, obj=None):
        # Keys in Redis and rows of in-flight requests hang off the name: it cannot change.
        return (*self.readonly_fields, "name") if obj else self.readonly_fields

    @admin.display(description="nodes")
    def node_count(self, obj: Topic) -> int:
        return obj.nodes.count()

    def save_model(self, request, obj: Topic, form, change: bool) -> None:
        # The saved row's configuration, before this save: the Redis the topic may be moving from.
        previous = Topic.objects.get(pk=obj.pk).config if change else None
        super().save_model(request, obj, form, change)
        try:
            with topic_redis_errors(obj):
                publish_topic(obj, previous)
        except TopicRedisUnavailable as exc:
            self.message_user(request, f"Saved, but Redis did not take the new configuration: {exc.message}",
                              messages.WARNING)
