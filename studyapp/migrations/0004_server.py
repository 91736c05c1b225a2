from django.db import migrations, models


class Migration(migrations.Migration):
    """Issue 10 (study server): ``Session.start_key``, the consent form's idempotency key."""

    dependencies = [
        ("studyapp", "0002_protocol_recruitment_quality"),
    ]

    operations = [
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
