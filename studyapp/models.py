"""Data model of a perceptual study (JND, 2AFC, rating or label protocol).

Study ─┬─ Condition (threat model × bound)
       ├─ Pair (natural image + its perturbed copy, or a sentinel: the same image twice)
       └─ Participant ── Session ── Trial (one pair shown in a random order) ── Judgment

Pair images are files under ``MEDIA_ROOT`` referenced by relative path; they are never served
by path, only through per-trial URLs (``studyapp.views``), so nothing a participant sees names a
condition or says whether a pair is a sentinel.
"""

from __future__ import annotations

import secrets

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Count, Q

from .protocols import image_paths, trial_spec


def _session_token() -> str:
    return secrets.token_urlsafe(24)


def _completion_code() -> str:
    return secrets.token_hex(4).upper()


class Study(models.Model):
    """A study: its items ("pairs"), its protocol and settings, and who took it.

    ``protocol`` says what a trial shows and asks (:mod:`studyapp.protocols`): ``jnd`` (image,
    blank, image: same or different?), ``2afc`` (a reference and two copies: which is more
    like the reference?), ``rating`` (rate a pair's difference or an image's quality on
    1..``rating_points``) or ``label`` (what is in this image? one of ``label_set``).
    """

    PROTOCOLS = [
        ("jnd", "JND: image, blank, image; same or different"),
        ("2afc", "2AFC: a reference and two copies; which is more like the reference"),
        ("rating", "rating: rate a pair's difference (DMOS) or an image's quality (MOS)"),
        ("label", "label: what is in the image (one of the study's label set)"),
    ]
    RATING_SHOWS = [
        ("pair", "pair: natural then perturbed image (JND timing); 1 = no difference"),
        ("single", "single: the image alone; 1 = bad quality … N = excellent"),
    ]

    slug = models.SlugField(unique=True, help_text="Appears in the participant link.")
    title = models.CharField(max_length=200)
    description = models.TextField(
        blank=True, help_text="For staff: how the pairs were made (networks, weights, seed)."
    )
    instructions = models.TextField(
        blank=True, help_text="Shown to participants before the first trial (plain text)."
    )
    is_active = models.BooleanField(default=True, help_text="Inactive studies refuse new sessions.")
    created_at = models.DateTimeField(auto_now_add=True)

    # --- protocols (issue 18; studyapp.protocols)
    protocol = models.CharField(
        max_length=10,
        choices=PROTOCOLS,
        default="jnd",
        help_text="What a trial shows and asks (see studyapp.protocols).",
    )
    rating_points = models.PositiveSmallIntegerField(
        default=5,
        validators=[MinValueValidator(2), MaxValueValidator(11)],
        help_text="Rating protocol: the scale is 1 … rating_points.",
    )
    rating_shows = models.CharField(
        max_length=6,
        choices=RATING_SHOWS,
        default="pair",
        help_text="Rating protocol: rate a pair's difference (DMOS) or one image's quality (MOS).",
    )
    retest_fraction = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Rating studies: share of a session's main items shown a second time later "
        "in the session (test–retest reliability); other protocols must leave it 0.",
    )
    label_set = models.JSONField(
        default=list,
        blank=True,
        help_text="Label protocol: the class names offered as answers (e.g. ImageNet-100's).",
    )

    # Protocol (PAT paper section 6; Zhang et al. 2018): image, blank, image, then same/different.
    first_ms = models.PositiveIntegerField(
        default=1000,
        validators=[MinValueValidator(50), MaxValueValidator(10_000)],
        help_text="How long the first image is shown, in milliseconds.",
    )
    blank_ms = models.PositiveIntegerField(
        default=250,
        validators=[MinValueValidator(0), MaxValueValidator(10_000)],
        help_text="Blank screen between the images, in milliseconds.",
    )
    second_ms = models.PositiveIntegerField(
        default=1000,
        validators=[MinValueValidator(50), MaxValueValidator(10_000)],
        help_text="How long the second image is shown, in milliseconds.",
    )
    trials_per_session = models.PositiveIntegerField(
        default=20, validators=[MinValueValidator(1), MaxValueValidator(1000)]
    )
    sentinel_fraction = models.FloatField(
        default=0.1,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share of each session's trials that are sentinel (identical) pairs.",
    )
    judgments_per_pair = models.PositiveIntegerField(
        default=5,
        validators=[MinValueValidator(1)],
        help_text="How many judgments each non-sentinel pair should receive (K).",
    )
    generation = models.JSONField(
        default=dict,
        blank=True,
        help_text="How the stimuli were generated: classifier, weights, LPIPS models, seed.",
    )

    # Participant flow
    consent_text = models.TextField(
        blank=True,
        help_text="Shown with an 'I agree' button before anything else; empty = no consent step.",
    )
    key_same = models.CharField(max_length=1, default="f", help_text="Key for 'same'.")
    key_different = models.CharField(max_length=1, default="j", help_text="Key for 'different'.")
    randomize_first = models.BooleanField(
        default=True, help_text="Randomise per trial which image comes first (else natural first)."
    )
    catch_fraction = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share of trials that are catch pairs (obviously different images).",
    )
    practice_trials = models.PositiveIntegerField(
        default=4,
        validators=[MaxValueValidator(50)],
        help_text="Practice trials with feedback before the main trials (never analysed).",
    )
    break_every = models.PositiveIntegerField(
        default=0, help_text="Offer a break after this many main trials; 0 = no breaks."
    )
    lease_minutes = models.PositiveIntegerField(
        default=30,
        validators=[MinValueValidator(1)],
        help_text="An unanswered trial returns to the pool this long after it was assigned.",
    )
    # Adaptive bound placement (issue 8; studyapp.adaptive)
    adaptive = models.BooleanField(
        default=False,
        help_text="Choose each session's ladder level per threat model with QUEST+ "
        "(pairs need a ladder level, see generate_pairs --ladder).",
    )
    adaptive_config = models.JSONField(
        default=dict,
        blank=True,
        help_text="QUEST+ settings: target, guess_rate, lapse_rate, sigmoid, grid sizes.",
    )

    # --- display (issue 17): pixel-exact stimuli (static/js/trials.js, studyapp.display)
    display_scale = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(16)],
        help_text="Device pixels per image pixel (n, each way): every image pixel is drawn as "
        "an n×n block of screen pixels. 0 = the image's own size in CSS pixels, i.e. n = the "
        "device pixel ratio, which is whole only at 100%/200% scaling (see display_rule).",
    )
    DISPLAY_RULES = [
        ("nearest", "draw at the nearest whole factor (and flag the session)"),
        ("reset_zoom", "ask the participant to change the zoom, and wait"),
        ("refuse", "refuse the session"),
    ]
    display_rule = models.CharField(
        max_length=12,
        choices=DISPLAY_RULES,
        default="nearest",
        help_text="With display_scale 0, when the device pixel ratio is not whole (Windows "
        "at 125%/150%, browser zoom): what the trial runner does.",
    )
    exclude_inexact_display = models.BooleanField(
        default=False,
        help_text="Exclude sessions whose stimuli were not drawn pixel-exact at the intended "
        "size (rescaled to the nearest whole factor, or resampled by the browser).",
    )

    # Recruitment
    allow_retakes = models.BooleanField(
        default=False, help_text="Let one participant take several sessions of this study."
    )
    prolific_completion_code = models.CharField(
        max_length=64,
        blank=True,
        help_text="Prolific's completion code; participants are sent back to Prolific with it.",
    )

    # Quality control (empty = rule not applied)
    fast_response_ms = models.PositiveIntegerField(
        default=150, help_text="Responses faster than this (ms) count as too fast."
    )
    max_sentinel_false_alarm = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Exclude sessions whose sentinel false-alarm rate is above this.",
    )
    min_catch_hit_rate = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Exclude sessions whose catch-trial hit rate is below this.",
    )
    max_fast_share = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Exclude sessions with a larger share of too-fast responses.",
    )
    # --- server (issue 10): automated-participant rules (flags always; exclusion opt-in)
    exclude_automation = models.BooleanField(
        default=False,
        help_text="Exclude sessions whose browser reported automation (navigator.webdriver, "
        "no trusted pointer or keyboard input, no browser signals at all).",
    )
    exclude_regular_rt = models.BooleanField(
        default=False, help_text="Exclude sessions whose response times are too regular."
    )
    exclude_superhuman = models.BooleanField(
        default=False,
        help_text="Exclude sessions too sensitive to pairs the study's participants barely see.",
    )

    class Meta:
        verbose_name_plural = "studies"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.title or self.slug

    def clean(self) -> None:
        if self.retest_fraction and self.protocol != "rating":
            raise ValidationError({"retest_fraction": "retests (test–retest reliability) are "
                                   f"for rating studies; this is a {self.protocol} study"})
        if self.protocol == "label" and not self.label_set:
            raise ValidationError({"label_set": "a label study needs its label set (the "
                                   "class names offered as answers)"})
        if self.protocol == "label":
            from .protocols import label_set_problem

            problem = label_set_problem(self.label_set)
            if problem:
                raise ValidationError({"label_set": problem})

    def has_judgments(self) -> bool:
        """Has anyone answered a trial of this study (practice included)?"""
        return Judgment.objects.of_study(self).exists()


class Condition(models.Model):
    """One threat model at one bound, e.g. ``linf:bound=4/255``."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="conditions")
    threat_model = models.CharField(max_length=50, help_text="Registry name, e.g. linf, l2.")
    bound = models.FloatField(
        help_text="Bound in the threat model's own units (Lp: [0,1] pixel scale)."
    )
    spec = models.CharField(max_length=300, help_text="Canonical attack spec string.")
    label = models.CharField(max_length=50, blank=True, help_text="e.g. small / medium / large")

    class Meta:
        ordering = ["threat_model", "bound"]
        constraints = [
            models.UniqueConstraint(fields=["study", "spec"], name="unique_condition_spec"),
        ]

    def __str__(self) -> str:
        return self.spec


class PairQuerySet(models.QuerySet):
    def with_judgment_counts(self) -> PairQuerySet:
        """Annotate ``n_judgments``: judgments stored for this pair in any session."""
        return self.annotate(n_judgments=Count("trials__judgment"))


class Pair(models.Model):
    """One item of a study: for JND a natural image and its perturbed copy (or itself: a
    sentinel pair). Per protocol (studyapp.protocols): 2AFC ``natural_path`` is the reference,
    ``other_path`` copy A, ``third_path`` copy B; rating and label show ``other_path`` (and,
    for rating pairs, ``natural_path`` first). Controls (``is_sentinel``): JND and rating
    identical pairs, a 2AFC triplet whose A equals the reference, a label gold item."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="pairs")
    condition = models.ForeignKey(
        Condition,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="pairs",
        help_text="Empty for sentinel pairs.",
    )
    is_sentinel = models.BooleanField(default=False)
    is_catch = models.BooleanField(
        default=False, help_text="Catch pair: two obviously different images (attention check)."
    )
    n_assigned = models.PositiveIntegerField(
        default=0,
        editable=False,
        help_text="Main-session trials holding this pair (judged, or under an active lease). "
        "Maintained by studyapp.scheduler only.",
    )
    key = models.CharField(
        max_length=300,
        help_text="Stable identity within the study (source image + spec); makes imports "
        "idempotent.",
    )
    source_image = models.CharField(max_length=200, help_text="Which natural image (and crop).")
    natural_path = models.CharField(max_length=500, help_text="PNG path relative to MEDIA_ROOT.")
    other_path = models.CharField(
        max_length=500,
        help_text="Perturbed PNG (relative to MEDIA_ROOT); the natural one for sentinels.",
    )
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    label = models.IntegerField(null=True, blank=True, help_text="Class the attack started from.")
    adversarial_label = models.IntegerField(null=True, blank=True)
    attack_success = models.BooleanField(null=True, blank=True)
    distances = models.JSONField(
        default=dict,
        blank=True,
        help_text="Distances between the two images: l2, linf, ssim, lpips_<model> ...",
    )
    metadata = models.JSONField(default=dict, blank=True)
    level = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Ladder index of the pair's bound within its threat model (0 = smallest); "
        "empty for fixed-bound studies and control pairs.",
    )
    # --- protocols (issue 18)
    third_path = models.CharField(
        max_length=500,
        blank=True,
        help_text="2AFC: copy B (relative to MEDIA_ROOT); empty for other protocols.",
    )
    condition_b = models.ForeignKey(
        Condition,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="pairs_b",
        help_text="2AFC: copy B's condition (``condition`` is copy A's).",
    )
    distances_b = models.JSONField(
        default=dict,
        blank=True,
        help_text="2AFC: distances between the reference and copy B (``distances``: copy A).",
    )
    class_name = models.CharField(
        max_length=200,
        blank=True,
        help_text="Label protocol: the source image's true class (one of Study.label_set).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = PairQuerySet.as_manager()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["study", "key"], name="unique_pair_key"),
            models.CheckConstraint(
                condition=Q(is_sentinel=True, is_catch=False, condition__isnull=True)
                | Q(is_sentinel=False, is_catch=True, condition__isnull=True)
                | Q(is_sentinel=False, is_catch=False, condition__isnull=False),
                name="control_pairs_have_no_condition",
            ),
        ]

    def clean(self) -> None:
        if self.is_sentinel and self.natural_path != self.other_path:
            raise ValidationError(
                "a control item shows its natural image unchanged (other_path == natural_path)"
            )

    def __str__(self) -> str:
        return self.key


class Participant(models.Model):
    """Someone who took part, identified per recruitment source (anonymous for plain links)."""

    SOURCES = [("link", "plain link"), ("mturk", "MTurk"), ("prolific", "Prolific")]

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="participants")
    source = models.CharField(max_length=20, choices=SOURCES, default="link")
    external_id = models.CharField(
        max_length=200, help_text="MTurk workerId, Prolific PROLIFIC_PID, or a random id."
    )
    is_simulated = models.BooleanField(
        default=False,
        help_text="A simulated observer (manage.py simulate_observers); analyses leave these "
        "out unless asked.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["study", "source", "external_id"], name="unique_participant"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source}:{self.external_id}"


class Session(models.Model):
    """One sitting of a participant: a fixed list of trials, then a completion code."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="sessions")
    token = models.CharField(max_length=64, unique=True, default=_session_token, editable=False)
    started_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    completion_code = models.CharField(max_length=16, default=_completion_code, editable=False)
    user_agent = models.TextField(blank=True)
    client_info = models.JSONField(
        default=dict, blank=True, help_text="Window size, device pixel ratio, refresh rate."
    )
    # Recruitment context (empty for plain links)
    assignment_id = models.CharField(max_length=200, blank=True, help_text="MTurk assignmentId.")
    hit_id = models.CharField(max_length=200, blank=True, help_text="MTurk hitId.")
    turk_submit_to = models.URLField(blank=True, help_text="MTurk turkSubmitTo (sandbox or live).")
    external_study_id = models.CharField(max_length=200, blank=True, help_text="Prolific STUDY_ID.")
    external_session_id = models.CharField(
        max_length=200, blank=True, help_text="Prolific SESSION_ID."
    )
    # Quality control: salted hashes only, never raw addresses
    ip_hash = models.CharField(max_length=64, blank=True, help_text="Salted SHA-256 of the IP.")
    browser_hash = models.CharField(
        max_length=64, blank=True, help_text="Salted SHA-256 of user agent + screen properties."
    )
    last_seen_at = models.DateTimeField(null=True, blank=True)
    abandoned_at = models.DateTimeField(
        null=True, blank=True, help_text="Set when its leases expired before it was completed."
    )
    excluded = models.BooleanField(default=False)
    exclusion_reason = models.TextField(blank=True)
    quality = models.JSONField(
        default=dict,
        blank=True,
        help_text="Sentinel false-alarm rate, catch hit rate, fast-response share, flags.",
    )
    # --- server (issue 10): a retried consent POST resumes the session its first try created
    start_key = models.CharField(
        max_length=64, null=True, blank=True, unique=True, editable=False,
        help_text="Random key of the consent form that started this session (idempotency).",
    )

    def __str__(self) -> str:
        return f"session {self.pk} of {self.participant}"

    @property
    def study(self) -> Study:
        return self.participant.study


class Trial(models.Model):
    """An item as shown in one session, at one position, with the order of its images."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="trials")
    position = models.PositiveIntegerField(help_text="0-based order within the session.")
    pair = models.ForeignKey(Pair, on_delete=models.PROTECT, related_name="trials")
    natural_first = models.BooleanField(
        help_text="True when the natural image was shown first (randomised per trial); "
        "2AFC: copy A drawn on the left; label and single-image rating: always True."
    )
    is_repeat = models.BooleanField(
        default=False,
        help_text="A retest: the item was already shown earlier in this session "
        "(Study.retest_fraction).",
    )
    is_practice = models.BooleanField(
        default=False, help_text="Practice trial with feedback: stored, never analysed or counted."
    )
    leased_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="An unanswered main trial holds its pair until then; NULL once answered.",
    )
    released = models.BooleanField(
        default=False, help_text="Its lease expired unanswered and the pair went back to the pool."
    )

    class Meta:
        ordering = ["session", "position"]
        constraints = [
            models.UniqueConstraint(fields=["session", "position"], name="unique_trial_position"),
            models.UniqueConstraint(
                fields=["session", "pair", "is_repeat"], name="unique_trial_pair"
            ),
        ]

    def __str__(self) -> str:
        return f"trial {self.position} of session {self.session_id}"

    def image_path(self, slot: int) -> str:
        """Relative path of the image shown in ``slot`` (1 = first; 2AFC: 1 = reference,
        2 = left, 3 = right), as :func:`studyapp.protocols.image_paths` lays them out."""
        study = self.session.participant.study
        paths = image_paths(study.protocol, trial_spec(study).n_images, self.natural_first,
                            self.pair.natural_path, self.pair.other_path, self.pair.third_path)
        if not 1 <= slot <= len(paths):
            raise ValueError(f"slot must be 1 … {len(paths)} for a {study.protocol} trial, "
                             f"got {slot}")
        return paths[slot - 1]


class JudgmentQuerySet(models.QuerySet):
    def of_study(self, study: Study | int) -> JudgmentQuerySet:
        """Judgments given in ``study``'s sessions (practice ones too)."""
        return self.filter(trial__session__participant__study=study)

    def main(self) -> JudgmentQuerySet:
        """Judgments of main trials: what is analysed and counted (practice left out)."""
        return self.filter(trial__is_practice=False)


class Judgment(models.Model):
    """A participant's answer to one trial, with the on-screen durations the browser measured.

    ``response`` is validated per protocol (studyapp.protocols): JND ``same``/``different``,
    2AFC ``left``/``right`` (as pressed), rating ``1``..``N``, label one of the label set.
    """

    RESPONSES = [("same", "same"), ("different", "different")]  # the JND protocol's

    trial = models.OneToOneField(Trial, on_delete=models.CASCADE, related_name="judgment")
    response = models.CharField(max_length=200)
    response_time_ms = models.FloatField(
        help_text="From the response prompt appearing to the key press or click, in ms."
    )
    first_ms = models.FloatField(help_text="Measured on-screen time of the first image, ms.")
    blank_ms = models.FloatField(
        null=True, blank=True,
        help_text="Measured blank between the images, ms; empty for one-image protocols.",
    )
    second_ms = models.FloatField(
        null=True, blank=True,
        help_text="Measured on-screen time of the second image, ms; empty for one-image "
        "protocols.",
    )
    # --- display (issue 17): how the browser drew this trial's images (empty: not reported)
    display_scale = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Device pixels per image pixel (n) the runner drew."
    )
    device_pixel_ratio = models.FloatField(
        null=True, blank=True, help_text="window.devicePixelRatio while the pair was shown."
    )
    display_exact = models.BooleanField(
        null=True,
        blank=True,
        help_text="The browser reported each image at exactly natural size × n device pixels "
        "(ResizeObserver device-pixel-content-box); False = resampled; empty = not measurable.",
    )
    idempotency_key = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = JudgmentQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.response} on {self.trial}"

    @property
    def said_different(self) -> bool:
        return self.response == "different"


# --- analysis & calibration (issue 8) ---


class CalibrationQuerySet(models.QuerySet):
    def people_only(self) -> CalibrationQuerySet:
        """Calibrations fitted without simulated observers (``calibrate`` without
        ``--include-simulated``)."""
        return self.exclude(settings__include_simulated=True)

    def latest_for(self, study: Study, *, include_simulated: bool = True) -> Calibration | None:
        """The study's newest calibration (or None); with ``include_simulated=False`` the
        newest fitted on people only."""
        rows = self.filter(study=study)
        if not include_simulated:
            rows = rows.people_only()
        return rows.order_by("-created_at", "-id").first()


class Calibration(models.Model):
    """Calibrated bound presets of a study: psychometric fits per threat model (``calibrate``).

    ``presets`` maps threat model → label (``p10``, ``p25``, ``p50``) → bound, in the threat
    model's own units; ``generate_pairs --bounds calibrated:SLUG`` uses the latest one.
    """

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="calibrations")
    created_at = models.DateTimeField(auto_now_add=True)
    targets = models.JSONField(help_text="Target perceptibilities, e.g. [0.1, 0.25, 0.5].")
    fit = models.JSONField(help_text="engine.calibration CalibrationResult.to_dict().")
    presets = models.JSONField(help_text="{threat_model: {label: bound}}.")
    counts = models.JSONField(
        default=dict, help_text="Judgments, participants and sessions the fit used."
    )
    settings = models.JSONField(
        default=dict, help_text="sigmoid, lapse, n_boot, seed, include_simulated."
    )
    code_version = models.CharField(max_length=100, blank=True)

    objects = CalibrationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        get_latest_by = ["created_at", "id"]

    @property
    def uses_simulated(self) -> bool:
        """Fitted with simulated observers' judgments allowed in (``--include-simulated``)."""
        return bool((self.settings or {}).get("include_simulated"))

    def __str__(self) -> str:
        return f"calibration {self.pk} of {self.study}"

# --- defenses (issue 9) ---


class DefenseResultQuerySet(models.QuerySet):
    def for_study(self, study: Study) -> DefenseResultQuerySet:
        """``study``'s defense results with their runs, oldest run first, in stored order."""
        return (self.filter(study=study).select_related("run")
                .order_by("run__created_at", "run_id", "id"))


class DefenseRun(models.Model):
    """A defense trained by ``python -m engine train`` (via ``manage.py train_defense``).

    Django only records it: the weights, logs and checkpoints live in ``run_dir``.
    """

    STATUSES = [("running", "running"), ("finished", "finished"), ("failed", "failed")]

    name = models.SlugField(max_length=100, unique=True)
    study = models.ForeignKey(Study, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="defense_runs")
    method = models.CharField(max_length=50, help_text="engine.objectives method name")
    method_params = models.JSONField(default=dict, blank=True)
    arch = models.CharField(max_length=50)
    dataset = models.CharField(max_length=200, help_text="digits, cifar10, imagenet100, ...")
    dataset_label = models.CharField(max_length=200, blank=True)
    run_dir = models.CharField(max_length=500, help_text="Run folder of the engine.")
    config = models.JSONField(default=dict, blank=True, help_text="The run's config.json.")
    status = models.CharField(max_length=10, choices=STATUSES, default="running")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.method}, {self.dataset})"


class DefenseResult(models.Model):
    """Robust accuracy of a defense under one threat model at one bound.

    ``perceptibility`` is the calibrated level (e.g. ``p25``: people see the perturbation
    25 % of the time) when the bound came from the study's calibration, else blank. With the
    study attached these give the dashboard's strength-vs-perceptibility plot (Fig. 4b).
    """

    run = models.ForeignKey(DefenseRun, on_delete=models.CASCADE, related_name="results")
    study = models.ForeignKey(Study, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="defense_results")
    column = models.CharField(max_length=100, help_text="Table column, e.g. 'linf 0.03137'.")
    threat_model = models.CharField(max_length=50, help_text="clean, union, unseen_mean or"
                                    " an attack name")
    bound = models.FloatField(null=True, blank=True, help_text="In the threat model's units.")
    spec = models.CharField(max_length=500, blank=True)
    label = models.CharField(max_length=50, blank=True, help_text="The bound's label: named"
                             " (small, medium, large, cifar10), calibrated (p25) or given"
                             " (VALUE@LABEL); blank for a plain number.")
    perceptibility = models.CharField(max_length=50, blank=True)
    accuracy = models.FloatField(validators=[MinValueValidator(0.0), MaxValueValidator(1.0)])
    n_images = models.PositiveIntegerField()
    evaluation_dir = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DefenseResultQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["study", "threat_model"])]

    def __str__(self) -> str:
        return f"{self.run.name}: {self.column} {self.accuracy:.3f}"


class DefenseCheck(models.Model):
    """One gradient-masking sanity check of a defense (``evaluate_defense --sanity``; the
    perceptual-prior paper, section 4.4): ``name`` is ``bound_monotone`` (accuracy falls as
    the bound grows), ``unbounded`` (an unbounded attack reaches about 0 %) or
    ``square_not_stronger`` (black-box Square is not stronger than white-box APGD-CE)."""

    run = models.ForeignKey(DefenseRun, on_delete=models.CASCADE, related_name="checks")
    study = models.ForeignKey(Study, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="defense_checks")
    name = models.CharField(max_length=50, help_text="bound_monotone, unbounded or"
                            " square_not_stronger")
    detail = models.CharField(max_length=300, blank=True)
    value = models.CharField(max_length=200, blank=True,
                             help_text="The accuracies compared, as the engine wrote them.")
    passed = models.BooleanField()
    evaluation_dir = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DefenseResultQuerySet.as_manager()

    class Meta:
        ordering = ["run", "id"]

    def __str__(self) -> str:
        return f"{self.run.name}: {self.name} {'passed' if self.passed else 'FAILED'}"
