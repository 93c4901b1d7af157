from django.contrib import admin, messages
from redis.exceptions import RedisError

from fdconsole.redis_conn import get_store
from fdconsole.topics.models import Topic
from scheduler.config import PARAMETERS


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = ("name", "scheduler_name", "scheduler_max_size", "scheduler_ttl", "node_count",
                    "updated_at")
    list_filter = ("scheduler_name",)
    search_fields = ("name",)
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("name", "created_at", "updated_at")}),
        ("Scheduler", {"fields": tuple(p.name for p in PARAMETERS)}),
    )

    @admin.display(description="nodes")
    def node_count(self, obj: Topic) -> int:
        return obj.nodes.count()

    def save_model(self, request, obj: Topic, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        try:
            get_store().publish_config(obj.name, obj.config)
        except RedisError as exc:
            self.message_user(request, f"Saved, but Redis did not take the new configuration: {exc}",
                              messages.WARNING)
