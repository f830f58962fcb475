"""The settings of one trial and the sweep file that spans many.

A sweep file (YAML) has ``fixed`` settings shared by every trial and a ``search`` space
over the same setting names. Each trial's settings are one flat, validated
``TrialSettings``: its fields are the MLflow params of the trial's run, so every run of
every sweep carries the same param names and compares side by side in the MLflow UI.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retina.errors import SweepFileError

Optimizer = Literal["sgd", "rmsprop", "adam", "adamw", "nadam", "radam", "adamax"]
FinalStrategy = Literal["retrain", "finetune", "none"]
Loss = Literal["dice_ce", "dice", "bce", "dice_focal", "tversky"]
LearningRateSchedule = Literal["constant", "cosine", "cosine_warmup", "onecycle", "plateau"]
# What the U-Net sees of a photo: its colour, its green channel (where vessels contrast
# best), or the green channel after contrast-limited adaptive histogram equalisation.
Preprocessing = Literal["rgb", "green", "green_clahe"]
PhotoNames = tuple[Annotated[str, Field(min_length=1)], ...]


# Settings that vary between the runs of one configuration rather than define it.
NOT_CONFIGURATION = frozenset({"split_seed", "seed", "strategy"})


class TrialSettings(BaseModel):
    """Everything that decides how one trial trains: data, model, optimisation, strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Data: the published experiment resized HRF to 512x512 and split at random.
    resolution: Annotated[int, Field(ge=32, le=4096)] = 512
    train_fraction: Annotated[float, Field(gt=0, lt=1)] = 2 / 3
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 1 / 6
    stratify: bool = True
    split_seed: Annotated[int, Field(ge=0)] = 0
    # A fixed split named photo by photo (such as the 15/30 HRF protocol) instead of a
    # seeded one: all three lists, or none.
    train_photos: PhotoNames = ()
    val_photos: PhotoNames = ()
    test_photos: PhotoNames = ()
    preprocessing: Preprocessing = "rgb"
    # Training on random square crops of the resized photo; inference then runs on the
    # whole photo with overlapping sliding windows of this size. 0: whole photos.
    patch_size: Annotated[int, Field(ge=0)] = 0
    patches_per_photo: Annotated[int, Field(ge=1)] = 1  # crops of each photo per epoch

    # Model: a 2-D MONAI U-Net with residual units.
    channels: tuple[Annotated[int, Field(ge=1)], ...] = (16, 32, 64, 128, 256)
    residual_units: Annotated[int, Field(ge=0, le=8)] = 2
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0

    # Optimisation of phase 1 (train split, validated every epoch).
    loss: Loss = "dice_ce"
    optimizer: Optimizer = "adamw"
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    lr_schedule: LearningRateSchedule = "onecycle"
    batch_size: Annotated[int, Field(ge=1)] = 4
    epochs: Annotated[int, Field(ge=1)] = 100
    patience: Annotated[int, Field(ge=0)] = 20  # epochs without a better val F1; 0: never stop
    seed: Annotated[int, Field(ge=0)] = 0  # weights and augmentation

    # Augmentation, drawn per photo on the training device.
    flips: bool = True
    rotations: bool = True  # multiples of 90 degrees
    brightness: Annotated[float, Field(ge=0, lt=1)] = 0.1
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.1
    rotation_degrees: Annotated[float, Field(ge=0, le=180)] = 0.0  # small rotations, +/-
    scaling: Annotated[float, Field(ge=0, lt=1)] = 0.0  # zoom by a factor in 1 +/- scaling
    gamma: Annotated[float, Field(ge=0, lt=1)] = 0.0  # intensity gamma in 1 +/- gamma

    # Evaluation: average the probabilities of the photo and its flips (test-time
    # augmentation) when predicting test photos and new ones.
    test_time_flips: bool = False

    # Phase 2: the final-training strategy.
    strategy: FinalStrategy = "retrain"
    finetune_epochs: Annotated[int, Field(ge=1)] = 10
    finetune_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.1

    # Devices: mixed precision and channels-last apply on CUDA only.
    mixed_precision: bool = True
    channels_last: bool = True

    @model_validator(mode="after")
    def _check_consistency(self) -> "TrialSettings":
        if self.train_fraction + self.val_fraction >= 1:
            raise ValueError(
                f"train_fraction + val_fraction is {self.train_fraction + self.val_fraction:.3g}"
                "; it must stay below 1 to leave photos for the test split"
            )
        if len(self.channels) < 2:
            raise ValueError("channels needs at least 2 widths (one down-sampling step)")
        divisor = 2 ** (len(self.channels) - 1)
        if self.resolution % divisor:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of {divisor} for "
                f"{len(self.channels)} U-Net levels"
            )
        if self.patch_size:
            if self.patch_size > self.resolution:
                raise ValueError(
                    f"patch_size {self.patch_size} is larger than resolution {self.resolution}"
                )
            if self.patch_size % divisor:
                raise ValueError(
                    f"patch_size {self.patch_size} must be a multiple of {divisor} for "
                    f"{len(self.channels)} U-Net levels"
                )
        named = {part: getattr(self, f"{part}_photos") for part in ("train", "val", "test")}
        if any(named.values()):
            for part, names in named.items():
                if not names:
                    raise ValueError(
                        f"{part}_photos is empty: a fixed split names the photos of all "
                        "three parts (train_photos, val_photos, test_photos)"
                    )
                if len(set(names)) != len(names):
                    raise ValueError(f"{part}_photos names a photo twice")
            for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
                shared = sorted(set(named[first]) & set(named[second]))
                if shared:
                    raise ValueError(
                        f"photo {shared[0]!r} is in both {first}_photos and {second}_photos"
                    )
        return self

    @property
    def fixed_split(self) -> bool:
        """Whether the split is named photo by photo rather than drawn with a seed."""
        return bool(self.train_photos)

    @property
    def input_channels(self) -> int:
        return 3 if self.preprocessing == "rgb" else 1

    @property
    def crops_per_photo(self) -> int:
        """Training samples drawn from each photo per epoch: its patches, or itself."""
        return self.patches_per_photo if self.patch_size else 1

    def with_test_time_flips(self, choice: bool | None) -> "TrialSettings":
        """These settings with flip averaging set as chosen; ``None`` keeps their own."""
        return self if choice is None else self.model_copy(update={"test_time_flips": choice})

    @property
    def configuration_key(self) -> str:
        """What a configuration is: every setting except the split seed, the weight seed
        and the strategy.

        Runs that share this key differ only in their data split, their random start or
        their final strategy, so their phase-1 validation scores are samples of the same
        configuration.
        """
        fields = self.model_dump(exclude=NOT_CONFIGURATION)
        return ";".join(f"{key}={value}" for key, value in sorted(fields.items()))

    def run_name(self) -> str:
        """A readable name such as ``adamw-lr3e-04-split2-retrain`` (``-seed1`` added for
        other weight seeds than 0)."""
        split = "fixedsplit" if self.fixed_split else f"split{self.split_seed}"
        name = f"{self.optimizer}-lr{self.learning_rate:.0e}-{split}-{self.strategy}"
        return f"{name}-seed{self.seed}" if self.seed else name

    def as_params(self) -> dict[str, str]:
        """Every setting as an MLflow param value (strings, tuples written as lists)."""
        return {
            key: ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            for key, value in self.model_dump().items()
        }

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TrialSettings":
        """Rebuild the settings of a run from its MLflow params."""
        known = {key: value for key, value in params.items() if key in cls.model_fields}
        if "channels" in known:
            known["channels"] = tuple(int(width) for width in known["channels"].split(","))
        for part in ("train_photos", "val_photos", "test_photos"):
            if part in known:
                known[part] = tuple(name for name in known[part].split(",") if name)
        return cls.model_validate(known)


class LogUniform(BaseModel):
    """Samples drawn log-uniformly between two bounds (learning rates, weight decay)."""

    model_config = ConfigDict(extra="forbid")
    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]


class Uniform(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uniform: tuple[float, float]


SearchAxis = list[Any] | LogUniform | Uniform


class Scheduler(BaseModel):
    """Early stopping of poor trials across the sweep, on validation F1."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["asha", "none"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 10  # epochs every trial gets
    reduction_factor: Annotated[float, Field(gt=1)] = 3


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_concurrent: Annotated[int, Field(ge=0)] = 0  # 0: as many as resources allow
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0
    # Data-parallel workers per trial (PyTorch DDP); more than 1 GPU per trial implies
    # one worker per GPU.
    workers_per_trial: Annotated[int, Field(ge=1)] = 1


class SweepSpec(BaseModel):
    """A validated sweep file."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, SearchAxis] = Field(default_factory=dict)
    num_samples: Annotated[int, Field(ge=1)] = 1  # draws of the sampled axes per grid point
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    max_failures: Annotated[int, Field(ge=0)] = 0  # retries of a failed trial from its checkpoint

    def grid_size(self) -> int:
        size = self.num_samples
        for axis in self.search.values():
            if isinstance(axis, list):
                size *= len(axis)
        return size


def _check_against_trial_settings(spec: SweepSpec, source: str) -> None:
    """Validate every fixed value and every search value as a TrialSettings field."""
    known = TrialSettings.model_fields
    for section in ("fixed", "search"):
        for key in getattr(spec, section):
            if key not in known:
                raise SweepFileError(
                    f"{source}: {section}.{key}: unknown setting; allowed: {', '.join(known)}"
                )
    if not spec.search:
        raise SweepFileError(f"{source}: search: empty search space; give at least one axis")
    for part in ("train_photos", "val_photos", "test_photos"):
        if part in spec.search:
            raise SweepFileError(
                f"{source}: search.{part}: a fixed split is declared in fixed, not searched"
            )
    if spec.fixed.get("train_photos") and "split_seed" in spec.search:
        raise SweepFileError(
            f"{source}: search.split_seed: the fixed split (train_photos, val_photos, "
            "test_photos) leaves nothing to a split seed; search seed for repeats instead"
        )
    if "resolution" in spec.search:
        # Photos are preprocessed once per sweep and shared by every trial.
        raise SweepFileError(f"{source}: search.resolution: resolution must be fixed in a sweep")

    def check(location: str, values: dict[str, Any]) -> None:
        try:
            TrialSettings.model_validate({**spec.fixed, **values})
        except ValidationError as error:
            raise SweepFileError(f"{source}: {location}: {_first_problem(error)}") from None

    check("fixed", {})
    for key, axis in spec.search.items():
        if isinstance(axis, list):
            if not axis:
                raise SweepFileError(f"{source}: search.{key}: empty list; give at least one value")
            for position, value in enumerate(axis):
                check(f"search.{key}[{position}]", {key: value})
        else:
            low, high = axis.loguniform if isinstance(axis, LogUniform) else axis.uniform
            if low >= high:
                raise SweepFileError(f"{source}: search.{key}: lower bound must be below upper")
            check(f"search.{key}", {key: low})
            check(f"search.{key}", {key: high})


def _first_problem(error: ValidationError) -> str:
    problems = error.errors()
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        message = f"got {first['input']!r}; {message.lower()}"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where + ': ' if where else ''}{message}{more}"


def load_sweep_file(path: Path) -> SweepSpec:
    """Read and validate a sweep file; every problem is one line naming file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SweepFileError(f"{path}: cannot read sweep file ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SweepFileError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise SweepFileError(f"{path}: expected a mapping of sections at the top level")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        raise SweepFileError(f"{path}: {_first_problem(error)}") from None
    _check_against_trial_settings(spec, str(path))
    return spec
