"""``manage.py prepare_stimuli``: this host's decoded stimulus rows, made before serving."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from studyapp import stimulus_rows
from studyapp.models import Pair, Study


class Command(BaseCommand):
    help = (
        "Decode every stimulus file of the active studies (or of --study SLUG, or of --all"
        " studies) into this host's rows folder (PERCEPTLAB_ROWS_DIR), so that no image is"
        " served for the first time while a participant waits: a first serving that decodes"
        " would be slower, and the slower image would be the perturbed one (issue 17). Run it"
        " on every web host after migrate and after importing pairs on another host (`make"
        " serve` does). Idempotent: prepared files are only read. Fails, listing them, if a"
        " stimulus file is missing or cannot be served."
    )

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--study", action="append", metavar="SLUG",
                           help="only this study (repeatable)")
        which.add_argument("--all", action="store_true", help="inactive studies too")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        pairs = Pair.objects.all()
        if opts["study"]:
            slugs = set(opts["study"])
            known = set(Study.objects.filter(slug__in=slugs).values_list("slug", flat=True))
            if slugs - known:
                every = ", ".join(Study.objects.values_list("slug", flat=True)) or "none"
                raise CommandError(
                    f"no study with slug {sorted(slugs - known)[0]!r} (studies: {every})"
                )
            pairs = pairs.filter(study__slug__in=slugs)
        elif not opts["all"]:
            pairs = pairs.filter(study__is_active=True)
        names = stimulus_rows.stimulus_names(pairs)
        summary = stimulus_rows.prepare(names, progress=not opts["no_progress"] and len(names) > 50)
        self.stdout.write(f"{summary} (rows in {stimulus_rows.rows_folder()})")
        if summary.failed:
            listing = "\n".join(f"  {name}: {reason}" for name, reason in summary.failed[:20])
            more = len(summary.failed) - 20
            raise CommandError(
                f"{len(summary.failed)} stimulus file(s) cannot be served:\n{listing}"
                + (f"\n  ... and {more} more" if more > 0 else "")
            )
