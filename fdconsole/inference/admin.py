from django.contrib import admin

from fdconsole.inference.models import Request


@admin.register(Request)
class RequestAdmin(admin.ModelAdmin):
    list_display = ("request_id", "topic", "model", "status", "home_node", "executed_by", "prompt_tokens",
                    "created_at", "finished_at")
    list_filter = ("status", "topic", "home_node")
    search_fields = ("request_id", "uid", "home_node", "executed_by")
    date_hierarchy = "created_at"
    list_select_related = ("topic",)

    def has_add_permission(self, request) -> bool:
        return False  # requests are submitted through the API or the console, which queue them

    def has_change_permission(self, request, obj=None) -> bool:
        return False
