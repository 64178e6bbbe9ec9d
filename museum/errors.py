"""Errors a user can fix. Each message says what went wrong and what to do; the CLI prints it as one
``error: ...`` line with exit code 2. Kept free of heavy imports so the CLI can catch them cheaply."""


class MuseumUserError(ValueError):
    """Base class of every user-fixable error."""


class MuseumError(MuseumUserError):
    """A museum on disk is missing, damaged or does not fit the request."""


class BaseModelError(MuseumUserError):
    """A base model could not be found or loaded."""


class ImageFolderError(MuseumUserError):
    """A concept image folder is unusable."""


class TokenError(MuseumUserError):
    """A concept token clashes with the vocabulary."""


class MuseumLockedError(MuseumUserError, RuntimeError):
    """Another process is writing to the museum."""


class TrainingDivergedError(MuseumUserError, RuntimeError):
    """The loss became NaN/Inf; nothing was saved."""
