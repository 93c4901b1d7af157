from django.contrib import admin, messages

from fdconsole.nodes.models import Node


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "topic", "role", "admin_state", "device", "host", "requests_run",
                    "requests_stolen", "last_started_at")
    list_filter = ("topic", "role", "admin_state")
    search_fields = ("name", "host")
    readonly_fields = ("requests_run", "requests_stolen", "host", "created_at", "updated_at",
                       "last_started_at")
    actions = ("enable_nodes", "drain_nodes", "disable_nodes")

    def _set_state(self, request, queryset, state: str) -> None:
        count = queryset.update(admin_state=state)
        self.message_user(request, f"{count} node(s) now {state}.", messages.SUCCESS)

    @admin.action(description="Enable: take new requests")
    def enable_nodes(self, request, queryset) -> None:
        self._set_state(request, queryset, Node.AdminState.ENABLED)

    @admin.action(description="Drain: finish queued work, take no new requests")
    def drain_nodes(self, request, queryset) -> None:
        self._set_state(request, queryset, Node.AdminState.DRAINING)

    @admin.action(description="Disable: take no new requests")
    def disable_nodes(self, request, queryset) -> None:
        self._set_state(request, queryset, Node.AdminState.DISABLED)
