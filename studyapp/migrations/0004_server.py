from django.db import migrations, models


class Migration(migrations.Migration):
    """Issue 10 (study server): ``Session.start_key`` (the consent form's idempotency key) and
    the automated-participant exclusion switches of ``Study`` (off by default)."""

    dependencies = [
        ("studyapp", "0003_analysis_calibration"),
    ]

    operations = [
        migrations.AddField(
            model_name="study",
            name="exclude_automation",
            field=models.BooleanField(
                default=False,
                help_text="Exclude sessions whose browser reported automation (navigator."
                "webdriver, no trusted pointer or keyboard input, no browser signals at all).",
            ),
        ),
        migrations.AddField(
            model_name="study",
            name="exclude_regular_rt",
            field=models.BooleanField(
                default=False, help_text="Exclude sessions whose response times are too regular."
            ),
        ),
        migrations.AddField(
            model_name="study",
            name="exclude_superhuman",
            field=models.BooleanField(
                default=False,
                help_text="Exclude sessions too sensitive to pairs the study's participants "
                "barely see.",
            ),
        ),
        migrations.AddField(
            model_name="session",
            name="start_key",
            field=models.CharField(
                blank=True, editable=False, max_length=64, null=True, unique=True,
                help_text="Random key of the consent form that started this session "
                "(idempotency).",
            ),
        ),
    ]
