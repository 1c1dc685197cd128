"""Pushes waiting for their peers, and what each peer was asked and answered (pure logic).

A push the hub has judged on its own held-out text waits here until ``wanted`` peers answered or
``wait_s`` passed; then it is judged on what came in (``due``). Each question to a peer has an
evaluation id of its own, an opaque counter: a peer learns neither the lease nor who pushed. A peer is
asked about a push at most once, and a node is asked about at most one push at a time (the caller
offers only idle nodes, and a node is busy until its answer or an error arrives).

Which peers are asked is ``relay.peers.choose_peers``; how often each (peer, pusher) pair was asked and
each peer's standing are kept here in memory, loaded from the registry at start and written back by
the coordinator with each concluded push.

An idle node that could take a lease or judge a push judges first: an evaluation costs seconds of a
node (a forward pass over at most ``gate.max_eval_blocks`` blocks per language, twice) against a lease's
hours, the push it judges holds its adapter (one lane) or its version (lanes) until it is decided, and
the nodes that can judge a push are those with its language's data, the very nodes that would train
that adapter next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from fedem_flwr.gate.peers import PeerResult, standing
from fedem_flwr.relay.peers import Candidate, choose_peers

ASKED, COUNTED, UNANSWERED = "asked", "counted", "unanswered"


@dataclass
class Question:
    """One evaluation asked of one peer about one push."""

    evaluation: int
    peer: str  # pseudonym
    identity: str  # the node's identity, to address it; never recorded
    at: float
    answered: Optional[float] = None
    outcome: str = ASKED  # counted, failed: <why>, unanswered
    result: Optional[PeerResult] = None


@dataclass
class Awaiting:
    """A push the hub judged, waiting for its peers; ``judged`` is the coordinator's own state of it."""

    token: int
    adapter: str
    pusher: str  # pseudonym
    serving: tuple[str, ...]
    base: str  # digest of the base it was judged on, which its peers must hold
    arrived: float
    deadline: float
    judged: Any
    questions: dict[str, Question] = field(default_factory=dict)  # by peer pseudonym

    def answered(self) -> int:
        return sum(1 for q in self.questions.values() if q.answered is not None)

    def results(self) -> list[PeerResult]:
        return [q.result for q in self.questions.values() if q.result is not None]


class PeerReview:
    """The pushes waiting for peers, by lease token, and the questions out, by evaluation id."""

    def __init__(self, wanted: int, wait_s: float, *, min_standing: float = 0.0,
                 pairs: Optional[Mapping[tuple[str, str], int]] = None,
                 standings: Optional[Mapping[str, tuple[int, int]]] = None) -> None:
        self.wanted = wanted
        self.wait_s = wait_s
        self.min_standing = min_standing
        self.pairs: dict[tuple[str, str], int] = dict(pairs or {})
        self.standings: dict[str, tuple[int, int]] = dict(standings or {})  # peer -> (agreed, disagreed)
        self.last_asked: dict[str, float] = {}
        self._waiting: dict[int, Awaiting] = {}
        self._questions: dict[int, tuple[Awaiting, Question]] = {}
        self._next_evaluation = 1

    def __len__(self) -> int:
        return len(self._waiting)

    def waiting(self) -> list[Awaiting]:
        """The pushes waiting, oldest first."""
        return sorted(self._waiting.values(), key=lambda a: (a.arrived, a.token))

    def holds(self, adapter: str) -> bool:
        """Whether a push of ``adapter`` waits for its peers."""
        return any(a.adapter == adapter for a in self._waiting.values())

    def standing(self, peer: str) -> float:
        return standing(*self.standings.get(peer, (0, 0)))

    def add(self, token: int, adapter: str, pusher: str, serving: Sequence[str], base: str, now: float,
            judged: Any) -> Awaiting:
        awaiting = Awaiting(token, adapter, pusher, tuple(serving), base, now, now + self.wait_s, judged)
        self._waiting[token] = awaiting
        return awaiting

    def ask(self, now: float, candidates: Sequence[tuple[Candidate, str]]) -> list[tuple[Awaiting, Question]]:
        """Questions for idle nodes: ``candidates`` pairs each node (as selection sees it; its standing is
        filled in here) with its identity. Oldest pushes are served first; a node gets one question at most."""
        free = {c.pseudonym: (replace(c, standing=self.standing(c.pseudonym)), identity) for c, identity in candidates}
        asked: list[tuple[Awaiting, Question]] = []
        for awaiting in self.waiting():
            short = self.wanted - len(awaiting.questions)
            if short <= 0 or now >= awaiting.deadline or not free:
                continue
            chosen = choose_peers([c for c, _ in free.values()], pusher=awaiting.pusher, serving=awaiting.serving,
                                  base=awaiting.base, wanted=short, pairs=self.pairs, last_asked=self.last_asked,
                                  key=str(awaiting.token), min_standing=self.min_standing,
                                  exclude=list(awaiting.questions))
            for peer in chosen:
                _, identity = free.pop(peer)
                question = Question(self._next_evaluation, peer, identity, now)
                self._next_evaluation += 1
                awaiting.questions[peer] = question
                self._questions[question.evaluation] = (awaiting, question)
                self.pairs[(peer, awaiting.pusher)] = self.pairs.get((peer, awaiting.pusher), 0) + 1
                self.last_asked[peer] = now
                asked.append((awaiting, question))
        return asked

    def question(self, evaluation: int) -> Optional[tuple[Awaiting, Question]]:
        """The push and question of ``evaluation``, while its push still waits."""
        return self._questions.get(evaluation)

    def answer(self, evaluation: int, result: PeerResult, now: float) -> Optional[Question]:
        """A peer's report came in; None when its push was already decided (a late answer)."""
        found = self._questions.pop(evaluation, None)
        if found is None:
            return None
        _, question = found
        question.answered, question.outcome, question.result = now, COUNTED, result
        return question

    def fail(self, evaluation: int, why: str, now: float) -> Optional[Question]:
        """A peer's answer failed its checks, or an error came instead; None when its push was decided."""
        found = self._questions.pop(evaluation, None)
        if found is None:
            return None
        _, question = found
        question.answered, question.outcome = now, f"failed: {why}"
        return question

    def due(self, now: float, force: bool = False) -> list[Awaiting]:
        """The pushes to decide now (removed from the waiting): every peer wanted answered, or their wait
        is over (``force``: all of them, as the relay stops). Questions still out are ``unanswered``."""
        ready = [a for a in self.waiting()
                 if force or now >= a.deadline or (len(a.questions) >= self.wanted and a.answered() >= self.wanted)]
        for awaiting in ready:
            del self._waiting[awaiting.token]
            for question in awaiting.questions.values():
                if question.answered is None:
                    question.outcome = UNANSWERED
                    self._questions.pop(question.evaluation, None)
        return ready

    def settle(self, judged: Mapping[str, bool]) -> dict[str, tuple[int, int]]:
        """Count each judged peer's agreement; returns the increments (agreed, disagreed) to record."""
        increments = {}
        for peer, agreed in judged.items():
            a, d = self.standings.get(peer, (0, 0))
            self.standings[peer] = (a + int(agreed), d + int(not agreed))
            increments[peer] = (int(agreed), int(not agreed))
        return increments
