from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "fdconsole.inference"
    label = "inference"
    verbose_name = "Inference requests"
