"""Voting rules: the tie WINNER (not just the tally), weights, and who votes."""

from __future__ import annotations

import pytest

from stepprobe.errors import StepprobeError
from stepprobe.voting import METHODS, Ballot, merge_answers, vote


@pytest.mark.parametrize("method", ["majority", "score", "confidence"])
def test_a_tie_goes_to_the_answer_seen_first(method):
    first = vote([Ballot("5", score=0.5, confidence=0.5), Ballot("4", score=0.5, confidence=0.5)], method)
    assert first.answer == "5" and first.tally == [("5", pytest.approx(1.0 if method == "majority" else 0.5)),
                                                   ("4", pytest.approx(1.0 if method == "majority" else 0.5))]
    assert vote([Ballot("4", score=0.5, confidence=0.5), Ballot("5", score=0.5, confidence=0.5)], method).answer == "4"


def test_a_tie_between_merged_classes_goes_to_the_class_seen_first():
    r = vote([Ballot("1/2"), Ballot("3"), Ballot("0.5"), Ballot("3")], "majority")
    assert r.answer == "1/2" and r.tally == [("1/2", 2.0), ("3", 2.0)] and r.weight == 2.0
    r = vote([Ballot("3"), Ballot("1/2"), Ballot("0.5"), Ballot("3")], "majority")
    assert r.answer == "3" and r.tally == [("3", 2.0), ("1/2", 2.0)]
    # Three-way tie after a non-tied leader would have been decided: the first seen wins.
    assert vote([Ballot("7"), Ballot("8"), Ballot("9")], "majority").answer == "7"
    assert vote([Ballot("7"), Ballot("8"), Ballot("8"), Ballot("9"), Ballot("9")], "majority").answer == "8"


def test_the_heaviest_class_wins_and_reports_its_weight():
    r = vote([Ballot("2", score=0.3), Ballot("9", score=0.2), Ballot("9", score=0.2), Ballot("2", score=0.05)],
             "score")
    assert r.answer == "9" and r.weight == pytest.approx(0.4) and r.voters == 4
    assert r.tally == [("2", pytest.approx(0.35)), ("9", pytest.approx(0.4))]
    m = vote([Ballot("2", score=0.3), Ballot("9", score=0.2), Ballot("9", score=0.2), Ballot("2", score=0.05)])
    assert m.answer == "2" and m.weight == 2.0  # majority is the default: a tie, "2" first


def test_weights_by_method():
    ballots = [Ballot("a", score=0.9, confidence=1.0), Ballot("b", score=0.1, confidence=2.0)]
    assert vote(ballots, "score").answer == "a" and vote(ballots, "confidence").answer == "b"
    # An unscored voter votes with the mean weight of its scored fellow voters: neither zero nor a
    # plain 1.0 that outweighs several calibrated probabilities (the issue-21 defect).
    assert vote([Ballot("a"), Ballot("b", score=0.9)], "score").tally == [("a", pytest.approx(0.9)),
                                                                          ("b", pytest.approx(0.9))]
    assert vote([Ballot("a"), Ballot("b", confidence=0.9)], "confidence").answer == "a"  # tie: first seen
    assert vote([Ballot("a", score=1.5), Ballot("b"), Ballot("b", score=0.4)], "score").tally[1] == ("b", pytest.approx(0.95 + 0.4))
    assert vote([Ballot("a", score=0.1)] * 3 + [Ballot("b")], "score").answer == "a"
    assert vote([Ballot("a", score=0.1)] * 3 + [Ballot("b")], "score").tally[1] == ("b", pytest.approx(0.1))
    # Pruned or answerless traces do not set the fill; nobody scored: plain votes.
    assert vote([Ballot("a", score=0.2), Ballot("b"), Ballot("b", pruned=True, score=0.9), Ballot(None, score=0.9)],
                "score").tally == [("a", pytest.approx(0.2)), ("b", pytest.approx(0.2))]
    assert vote([Ballot("a"), Ballot("b"), Ballot("b")], "score").tally == [("a", 1.0), ("b", 2.0)]
    # Negative weights count as zero, they do not subtract.
    r = vote([Ballot("a", score=-1.0), Ballot("a", score=0.6), Ballot("b", score=0.5)], "score")
    assert r.answer == "a" and r.tally == [("a", pytest.approx(0.6)), ("b", pytest.approx(0.5))]
    assert vote([Ballot("a", score=0.0), Ballot("b", score=0.0)], "score").weight == 0.0


def test_who_votes():
    ballots = [Ballot("7", pruned=True), Ballot("7", pruned=True), Ballot("3"), Ballot(None), Ballot(None)]
    r = vote(ballots, "majority")
    assert r.answer == "3" and r.voters == 1 and r.tally == [("3", 1.0)]
    r = vote(ballots, "majority", include_pruned=True)
    assert r.answer == "7" and r.voters == 3 and r.tally == [("7", 2.0), ("3", 1.0)]
    empty = vote([Ballot(None), Ballot("1", pruned=True)], "score")
    assert (empty.answer, empty.weight, empty.tally, empty.voters) == (None, 0.0, [], 0)


def test_merge_answers_classes_in_first_seen_order():
    assert merge_answers(["1/2", "3", "0.5", "\\frac{1}{2}", "3", "4"]) == [[0, 2, 3], [1, 4], [5]]
    assert merge_answers([]) == []


def test_unknown_method_is_refused_with_the_known_ones():
    assert METHODS == ("majority", "score", "confidence")
    with pytest.raises(StepprobeError, match="unknown voting method 'plurality'; known: majority, score, confidence"):
        vote([Ballot("1")], "plurality")


def test_voting_merges_equivalent_answers_and_skips_pruned():
    ballots = [Ballot("1/2", score=0.3), Ballot("0.5", score=0.3), Ballot("7", score=0.9),
               Ballot("7", pruned=True, score=0.9), Ballot(None, score=1.0)]
    assert vote(ballots, "majority").answer == "1/2"
    assert vote(ballots, "majority").voters == 3
    assert vote(ballots, "score").answer == "7"
    assert vote(ballots, "majority", include_pruned=True).tally == [("1/2", 2.0), ("7", 2.0)]
    assert vote([Ballot("3", confidence=2.0), Ballot("4", confidence=5.0)], "confidence").answer == "4"
    assert vote([], "score").answer is None
    with pytest.raises(StepprobeError):
        vote(ballots, "plurality")
