"""API tokens in the admin: a staff user sees and mints only their own (a superuser, anyone's); the plain
token is shown once, when it is made; revoking is one-way."""

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied

from fdconsole.api.models import SCOPE_HELP, SCOPES, ApiToken, hash_token, scope_list


class ApiTokenForm(forms.ModelForm):
    scope_choices = forms.MultipleChoiceField(
        label="Scopes", choices=[(s, f"{s}: {SCOPE_HELP[s]}") for s in SCOPES], initial=list(SCOPES),
        widget=forms.CheckboxSelectMultiple,
        help_text="What the token may do, within its user's permissions.")

    class Meta:
        model = ApiToken
        fields = ("user", "name", "expires_at", "rpm", "max_in_flight", "revoked")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.initial["scope_choices"] = sorted(self.instance.scope_set)

    def clean_rpm(self):
        return _positive(self.cleaned_data.get("rpm"), "rpm")

    def clean_max_in_flight(self):
        return _positive(self.cleaned_data.get("max_in_flight"), "max_in_flight")

    def save(self, commit: bool = True) -> ApiToken:
        self.instance.scopes = scope_list(self.cleaned_data["scope_choices"])
        return super().save(commit)


def _positive(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise forms.ValidationError(f"{name} must be at least 1; leave it empty for no limit")
    return value


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    form = ApiTokenForm
    list_display = ("prefix", "user", "name", "scopes", "expires_at", "rpm", "max_in_flight", "created_at",
                    "last_used_at", "revoked")
    list_filter = ("revoked",)
    search_fields = ("prefix", "name", "user__username")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_tokens",)

    def get_fieldsets(self, request, obj=None):
        fields = ["user", "name", "scope_choices", "expires_at", "rpm", "max_in_flight", "revoked"]
        return [(None, {"fields": fields}), ("Record", {"fields": self.readonly_fields})]

    def get_readonly_fields(self, request, obj=None):
        readonly = list(self.readonly_fields)
        if obj is not None:
            readonly.append("user")  # a token stays its user's
            if obj.revoked:
                readonly.append("revoked")  # for good
        return readonly

    def get_queryset(self, request):
        rows = super().get_queryset(request).select_related("user")
        return rows if request.user.is_superuser else rows.filter(user=request.user)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user" and not request.user.is_superuser:  # staff mint tokens for themselves
            kwargs["queryset"] = get_user_model().objects.filter(pk=request.user.pk)
            kwargs["initial"] = request.user.pk
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def save_model(self, request, obj: ApiToken, form, change: bool) -> None:
        if not request.user.is_superuser and obj.user_id != request.user.pk:  # a forged form
            raise PermissionDenied("a staff user mints API tokens only for themselves")
        if change:
            super().save_model(request, obj, form, change)
            return
        row, plain = ApiToken.issue(obj.user, obj.name, obj.scopes, expires_at=obj.expires_at, rpm=obj.rpm,
                                    max_in_flight=obj.max_in_flight)
        if obj.revoked:  # the form offers the box on add too; honour it rather than issue a live token
            row.revoke()
        obj.pk, obj.prefix, obj.token_hash = row.pk, row.prefix, hash_token(plain)
        self.message_user(request, f"New token (shown only now, copy it): {plain}", messages.WARNING)

    @admin.action(description="Revoke: refuse these tokens from now on, for good", permissions=["change"])
    def revoke_tokens(self, request, queryset) -> None:
        count = 0
        for token in queryset.filter(revoked=False):
            token.revoke()
            count += 1
        self.message_user(request, f"{count} token(s) revoked.", messages.SUCCESS)
