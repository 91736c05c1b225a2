from django.apps import AppConfig


class StudyappConfig(AppConfig):
    name = "studyapp"
    verbose_name = "Perceptual studies"

    def ready(self) -> None:
        from . import stimulus_rows  # noqa: F401  (registers the storage-backend check)
