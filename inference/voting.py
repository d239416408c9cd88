"""Moved to :mod:`stepprobe.voting` (shared by ``collect`` and ``run``); kept for old imports."""

from stepprobe.voting import METHODS, Ballot, VoteResult, merge_answers, vote  # noqa: F401
