from django.contrib import admin, messages

from fdconsole.api.models import ApiToken, hash_token


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at", "last_used_at", "revoked")
    list_filter = ("revoked",)
    search_fields = ("prefix", "name", "user__username")
    fields = ("user", "name", "revoked", "prefix", "created_at", "last_used_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")

    def save_model(self, request, obj: ApiToken, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        row, plain = ApiToken.issue(obj.user, obj.name)
        if obj.revoked:  # the form offers the box on add too; honour it rather than issue a live token
            ApiToken.objects.filter(pk=row.pk).update(revoked=True)
        obj.pk, obj.prefix, obj.token_hash = row.pk, row.prefix, hash_token(plain)
        self.message_user(request, f"New token (shown only now, copy it): {plain}", messages.WARNING)
