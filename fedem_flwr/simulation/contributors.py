"""Virtual contributors: how fast each one trains, when it is online, and whether it vanishes
mid-lease -- seeded by the run's seed and the contributor's partition, so the hub (its simulated
fleet) and the node (its ClientApp) draw the same contributor without telling each other.

Pure logic: no Flower, no torch. Speeds are optimizer steps per simulated second, log-normal
across contributors around ``sim.speed``; each lease's duration varies around the contributor's own
speed (``sim.jitter_sigma``), so a contributor that plans to finish just in time is sometimes late.
A ``daily`` contributor is online for its share of every period, starting at its own hour (time
zones); a vanished one is away until its next window opens (``daily``) or for ``sim.away_s``.

A peer evaluation (``evaluate.peer``) costs a contributor time too: it scores a candidate and its
parent, a forward pass each over at most ``max-blocks`` blocks of every language asked, and a forward
pass costs about a third of a training step's work per token (no backward pass, no optimizer step).
So it takes ``2 * max_blocks * block_size * languages / (3 * speed * tokens_per_step)`` simulated
seconds (``evaluation_seconds``), with the same per-lease pace and the same chance of vanishing as a lease.
That is an upper bound (``sim.peer_eval_cost=max-blocks``): a peer holding fewer held-out blocks scores
fewer, and by default (``scored``) an evaluation is priced at the tokens it reports (``scoring_seconds``),
capped by the bound.

Harmful contributors (``sim.harmful_share``, ``harmful_partitions``): a share of the partitions, drawn
by the seed, whose pushes the simulation scales (``sim.harm_scale``) -- a broken or malicious
contributor, such as one training at a far too high rate or one poisoning adapters on purpose.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Optional

from fedem_flwr.config.schema import SimConfig


def _rng(*parts: object) -> random.Random:
    """A generator seeded from ``parts`` alone (not from Python's salted ``hash``)."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class LeasePlan:
    """What one lease will cost a contributor, in steps and simulated seconds.

    ``steps`` are those it plans (what fits its budget at its speed); ``duration_s`` is when its
    reply would arrive. A vanishing contributor trains ``steps_done`` of them and is silent from
    ``vanish_at_s`` on; the others train all of them."""

    steps: int
    duration_s: float
    vanish_at_s: Optional[float] = None
    steps_done: int = 0

    @property
    def vanishes(self) -> bool:
        return self.vanish_at_s is not None


@dataclass(frozen=True)
class VirtualContributor:
    partition_id: int
    speed: float  # optimizer steps per simulated second
    online_fraction: float
    phase_s: float  # when its window opens within each period
    cfg: SimConfig
    seed: int

    def plan(self, token: int, budget_s: float, max_steps: int) -> LeasePlan:
        """The lease ``token``'s plan: as many steps as fit ``budget_s`` (at least one), then the
        draw of this lease's pace and of vanishing, both seeded by the lease."""
        fit = budget_s * self.speed
        steps = max(1, int(max_steps) if not math.isfinite(fit) else min(int(max_steps), int(math.floor(fit))))
        duration, share = self._draw("lease", token, steps / self.speed)
        if share is not None:
            return LeasePlan(steps, duration, vanish_at_s=duration * share, steps_done=int(steps * share))
        return LeasePlan(steps, duration, steps_done=steps)

    def evaluation(self, token: object, seconds: float) -> LeasePlan:
        """The plan of peer evaluation ``token`` that takes ``seconds`` at this contributor's speed
        (``evaluation_seconds``): this request's pace and whether it vanishes, drawn as a lease's are."""
        duration, share = self._draw("evaluation", token, seconds)
        return LeasePlan(0, duration) if share is None else LeasePlan(0, duration, vanish_at_s=duration * share)

    def _draw(self, kind: str, token: object, seconds: float) -> tuple[float, Optional[float]]:
        """``seconds`` at request ``token``'s pace, and the share of that time after which its contributor
        vanishes (None: it does not), both seeded by the request."""
        rng = _rng(kind, self.seed, self.partition_id, token)
        pace = math.exp(rng.gauss(0.0, self.cfg.jitter_sigma)) if self.cfg.jitter_sigma else 1.0
        return seconds * pace, (rng.random() if rng.random() < self.cfg.vanish_prob else None)

    def online(self, t: float) -> bool:
        """Whether it is online at simulated time ``t`` (seconds since the start)."""
        if self.cfg.availability == "always":
            return True
        period, window = self.cfg.period_s, self.online_fraction * self.cfg.period_s
        if window >= period:
            return True
        into = (t - self.phase_s) % period
        eps = 1e-9 * period  # as in ``next_change``: the clock stops on an edge, and is past it there
        return into < window - eps or into >= period - eps

    def online_seconds(self, a: float, b: float) -> float:
        """Seconds of ``[a, b)`` it is online: the integral of ``online``, in closed form, so that
        online time is exact whatever the steps the clock took."""
        if b <= a:
            return 0.0
        if self.cfg.availability == "always":
            return b - a
        return self._online_until(b) - self._online_until(a)

    def _online_until(self, t: float) -> float:
        """Online seconds from its first window's opening (``phase_s``) to ``t``, windows before it
        counted negatively: a difference of two of these is the online time between them."""
        period = self.cfg.period_s
        window = min(period, self.online_fraction * period)
        cycles, into = divmod(t - self.phase_s, period)
        return cycles * window + min(into, window)

    def next_change(self, t: float) -> float:
        """The first time after ``t`` at which ``online`` changes (``inf`` when it never does)."""
        if self.cfg.availability == "always":
            return math.inf
        period, window = self.cfg.period_s, self.online_fraction * self.cfg.period_s
        if window >= period:
            return math.inf
        into = (t - self.phase_s) % period
        eps = 1e-9 * period  # a time that rounds onto a boundary counts as past it
        if into < window - eps:
            return t + (window - into)
        if into < period - eps:
            return t + (period - into)
        return t + (period - into) + window

    def back_after_vanishing(self, t: float) -> float:
        """When a contributor that vanished at ``t`` is online again."""
        if self.cfg.availability == "always":
            return t + self.cfg.away_s
        period = self.cfg.period_s
        return t + (period - (t - self.phase_s) % period)  # its next window opens


def virtual_contributor(cfg: SimConfig, seed: int, partition_id: int) -> VirtualContributor:
    """Contributor ``partition_id`` of a run seeded ``seed``: the same on the hub and on the node."""
    rng = _rng("contributor", seed, partition_id)
    speed = cfg.speed * math.exp(rng.gauss(0.0, cfg.speed_sigma)) if cfg.speed_sigma else cfg.speed
    # Online shares spread around the mean, within (5%, 100%].
    share = min(1.0, max(0.05, rng.gauss(cfg.online_fraction, 0.15))) if cfg.online_fraction < 1 else 1.0
    return VirtualContributor(partition_id, speed, share, rng.uniform(0.0, cfg.period_s), cfg, seed)


def evaluation_seconds(speed: float, *, max_blocks: int, block_size: int, languages: int,
                       tokens_per_step: int) -> float:
    """Simulated seconds a peer evaluation takes at ``speed`` optimizer steps per second, at most: it
    scores candidate and parent (2 forward passes) on at most ``max_blocks`` blocks of each language
    asked, and a forward pass costs about a third of a training step's work per token."""
    return scoring_seconds(speed, tokens=max_blocks * block_size * languages, tokens_per_step=tokens_per_step)


def scoring_seconds(speed: float, *, tokens: float, tokens_per_step: int) -> float:
    """Simulated seconds to score candidate and parent on ``tokens`` tokens each (``sim.peer_eval_cost=scored``:
    the tokens a peer reports it scored, fewer than ``evaluation_seconds`` assumes when it holds fewer blocks)."""
    return 2.0 * tokens / (3.0 * speed * tokens_per_step)


def harmful_partitions(cfg: SimConfig, seed: int, num_partitions: int) -> frozenset[int]:
    """The partitions whose contributors are harmful: ``round(sim.harmful_share * num_partitions)`` of
    them, drawn by ``seed`` alone, so every run of a seed has the same ones whatever else it sets."""
    count = int(round(cfg.harmful_share * num_partitions))
    if count <= 0:
        return frozenset()
    return frozenset(_rng("harmful", seed, num_partitions).sample(range(num_partitions), count))
