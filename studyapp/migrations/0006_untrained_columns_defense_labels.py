"""Issue 15: DefenseResult.label; LPIPS distance columns name untrained weights.

Pairs generated before this with an untrained LPIPS network stored its distances as
``lpips_<arch>`` (e.g. ``lpips_alexnet``), the pretrained network's name. This renames them
to ``lpips_<arch>_untrained`` (what the engine now writes) wherever the study's recorded
generation says that network was untrained, so no reader mistakes them for pretrained ones.
"""

from django.db import migrations, models


def _untrained_renames(generation: dict) -> dict[str, str]:
    renames = {}
    for name, desc in (generation or {}).get("lpips_models", {}).items():
        if not isinstance(desc, dict) or desc.get("lpips_weights") != "untrained":
            continue
        base = name.split(":")[0]
        if base.endswith("_untrained"):
            continue
        new = f"lpips_{base}_untrained"
        renames[f"lpips_{name}"] = new
        renames[f"lpips_{base}"] = new
    return renames


def rename_untrained_columns(apps, schema_editor):
    Study = apps.get_model("studyapp", "Study")
    Pair = apps.get_model("studyapp", "Pair")
    for study in Study.objects.all().iterator():
        renames = _untrained_renames(study.generation)
        if not renames:
            continue
        changed = []
        for pair in Pair.objects.filter(study=study).only("id", "distances").iterator():
            if any(k in pair.distances for k in renames):
                pair.distances = {renames.get(k, k): v for k, v in pair.distances.items()}
                changed.append(pair)
        Pair.objects.bulk_update(changed, ["distances"], batch_size=500)
        models_ = study.generation.get("lpips_models", {})
        study.generation["lpips_models"] = {
            renames.get(f"lpips_{k}", f"lpips_{k}").removeprefix("lpips_"): v
            for k, v in models_.items()}
        study.save(update_fields=["generation"])


class Migration(migrations.Migration):
    dependencies = [("studyapp", "0005_defenses")]

    operations = [
        migrations.AddField(
            model_name="defenseresult",
            name="label",
            field=models.CharField(blank=True, help_text="The bound's label: named (small,"
                                   " medium, large, cifar10), calibrated (p25) or given"
                                   " (VALUE@LABEL); blank for a plain number.",
                                   max_length=50),
        ),
        migrations.RunPython(rename_untrained_columns, migrations.RunPython.noop),
    ]
