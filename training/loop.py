"""The training loop every method runs in.

"""

from __future__ import annotations

from medssl.errors import MedsslError

__all__ = ["TrainingDivergedError"]


class TrainingDivergedError(MedsslError):
    """The loss stopped being finite; the last good checkpoint is kept."""
