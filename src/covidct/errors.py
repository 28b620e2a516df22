"""Errors that the command line turns into one clear line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class CovidctError(Exception):
    """A failure on user data: names the step, the patient and the file it failed on.

    ``str(err)`` is the one-line message that the command line prints, e.g.
    ``ingest: patient P007: /data/P007/ct.dcm: fewer than 3 slices (found 2)``.
    """

    def __init__(self, message: str, *, step: str | None = None, patient: str | None = None,
                 path: str | Path | None = None):
        self.message = message
        self.step = step
        self.patient = patient
        self.path = None if path is None else str(path)
        super().__init__(message)

    def with_context(self, *, step: str | None = None, patient: str | None = None,
                     path: str | Path | None = None) -> CovidctError:
        """Fill in context that the raising code did not know (never overwrites what it knew)."""
        self.step = self.step or step
        self.patient = self.patient or patient
        if self.path is None and path is not None:
            self.path = str(path)
        return self

    def __str__(self) -> str:
        parts = [p for p in (self.step,
                             f"patient {self.patient}" if self.patient else None,
                             self.path) if p]
        return ": ".join(parts + [self.message])
