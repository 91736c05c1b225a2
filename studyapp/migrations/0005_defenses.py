# Defenses (issue 9): training runs and their evaluation results.

import django.core.validators
import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('studyapp', '0004_server'),
    ]

    operations = [
        migrations.CreateModel(
            name='DefenseRun',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.SlugField(max_length=100, unique=True)),
                ('method', models.CharField(help_text='engine.objectives method name', max_length=50)),
                ('method_params', models.JSONField(blank=True, default=dict)),
                ('arch', models.CharField(max_length=50)),
                ('dataset', models.CharField(help_text='digits, cifar10, imagenet100, ...', max_length=200)),
                ('dataset_label', models.CharField(blank=True, max_length=200)),
                ('run_dir', models.CharField(help_text='Run folder of the engine.', max_length=500)),
                ('config', models.JSONField(blank=True, default=dict, help_text="The run's config.json.")),
                ('status', models.CharField(choices=[('running', 'running'), ('finished', 'finished'), ('failed', 'failed')], default='running', max_length=10)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('study', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='defense_runs', to='studyapp.study')),
            ],
        ),
        migrations.CreateModel(
            name='DefenseResult',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('column', models.CharField(help_text="Table column, e.g. 'linf 0.03137'.", max_length=100)),
                ('threat_model', models.CharField(help_text='clean, union, unseen_mean or an attack name', max_length=50)),
                ('bound', models.FloatField(blank=True, help_text="In the threat model's units.", null=True)),
                ('spec', models.CharField(blank=True, max_length=500)),
                ('perceptibility', models.CharField(blank=True, max_length=50)),
                ('accuracy', models.FloatField(validators=[django.core.validators.MinValueValidator(0.0), django.core.validators.MaxValueValidator(1.0)])),
                ('n_images', models.PositiveIntegerField()),
                ('evaluation_dir', models.CharField(blank=True, max_length=500)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='results', to='studyapp.defenserun')),
                ('study', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='defense_results', to='studyapp.study')),
            ],
            options={
                'indexes': [models.Index(fields=['study', 'threat_model'], name='studyapp_de_study_i_a4a5ce_idx')],
            },
        ),
    ]
