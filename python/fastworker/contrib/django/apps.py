from django.apps import AppConfig


class FastworkerConfig(AppConfig):
    name = "fastworker.contrib.django"
    label = "fastworker"
    verbose_name = "fastworker"
