from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from fdconsole.nodes.models import CAPACITY_FIELDS, Node


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "topic", "role", "admin_state", "device", "max_num_seqs", "block_size", "host",
                    "requests_run", "requests_stolen", "last_started_at", "restarts", "last_exit",
                    "live_view")
    list_filter = ("topic", "role", "admin_state")
    search_fields = ("name", "host")
    readonly_fields = ("requests_run", "requests_stolen", "host", "created_at", "updated_at",
                       "last_started_at", "last_exit_status", "last_exit_at", "restarts")
    fieldsets = (
        (None, {"fields": ("name", "topic", "role", "device", "admin_state")}),
        ("Capacity", {
            "fields": CAPACITY_FIELDS,
            "description": "The node's engine: its batch, per-step token budget and KV cache. These "
                           "take effect when the node process (re)starts; a running node keeps the "
                           "capacity it started with.",
        }),
        ("Activity", {"fields": readonly_fields}),
    )
    actions = ("enable_nodes", "drain_nodes", "disable_nodes")

    @admin.display(description="Last exit", ordering="last_exit_at")
    def last_exit(self, node: Node) -> str:
        """How its process last ended, as fdcluster saw it; a dash when it never died under fdcluster."""
        return node.last_exit_status or "–"

    @admin.display(description="Live")
    def live_view(self, node: Node) -> str:
        return format_html('<a href="{}">live view</a>', reverse("topic", kwargs={"topic": node.topic.name}))

    def _set_state(self, request, queryset, state: str) -> None:
        count = queryset.update(admin_state=state)
        topics = sorted(set(queryset.values_list("topic__name", flat=True)))
        links = format_html(", ".join('<a href="{}">{}</a>' for _ in topics),
                            *[x for t in topics for x in (reverse("topic", kwargs={"topic": t}), t)])
        self.message_user(request, format_html(
            "{} node(s) now {}; running workers apply it within a second. Watch it on the live view: {}",
            count, state, links), messages.SUCCESS)

    @admin.action(description="Enable: take new requests", permissions=["change"])
    def enable_nodes(self, request, queryset) -> None:
        self._set_state(request, queryset, Node.AdminState.ENABLED)

    @admin.action(description="Drain: finish queued work, take no new requests", permissions=["change"])
    def drain_nodes(self, request, queryset) -> None:
        self._set_state(request, queryset, Node.AdminState.DRAINING)

    @admin.action(description="Disable: take no new requests", permissions=["change"])
    def disable_nodes(self, request, queryset) -> None:
        self._set_state(request, queryset, Node.AdminState.DISABLED)
