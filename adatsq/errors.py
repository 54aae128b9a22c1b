"""One error family for everything a user can get wrong; the CLI turns these into one line + exit 2."""


class AdatsqError(Exception):
    """Base of every error adatsq raises on purpose (bad input, bad files, impossible requests)."""


class ConfigError(AdatsqError):
    """A recipe, plan or argument has an unknown key, a wrong type or a value outside the allowed set."""


class OutputError(ConfigError):
    """An output path cannot be written: taken by another kind of file, read-only, or the disk is full."""


class SamplingError(ConfigError):
    """A pipeline refused the sampling settings adatsq called it with (its adatsq_pipeline.json)."""


class CheckpointError(AdatsqError):
    """A checkpoint folder is missing, truncated, corrupted or inconsistent with its config."""


class CalibrationError(AdatsqError):
    """Calibration produced nothing usable (no layer matched, empty set, NaN/inf activations)."""


class PlanError(AdatsqError):
    """A bit-width plan is infeasible or does not match the model / sampler it is applied to."""


class TokenReductionError(AdatsqError):
    """A token reducer was given inconsistent shapes, ratios or a model it cannot serve."""


class ExportError(AdatsqError):
    """A checkpoint or plan holds something an export target cannot represent faithfully."""
