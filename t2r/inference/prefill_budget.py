"""How many prompt tokens a prefill may take between two decode steps (chunked prefill's budget).

A server prefills a long prompt in segments between the decode steps of the rows already running
(vLLM's chunked prefill, with its token budget per step). A segment of a fixed size costs what it
costs whatever the batch does: 256 tokens here take several decode steps' time, and every running
stream would wait that long once per segment. So the budget follows the measurements: a segment
may take about `share` of a decode step's time, at the prefill speed measured so far, split among
the prompts being prefilled, within [smallest, largest] tokens. With no row decoding there is
nobody to stall: a segment takes `largest` (which also bounds the logits a scored prompt holds).
"""

from __future__ import annotations

PREFILL_SEGMENT = 256  # the largest segment: a scored prompt (echo + logprobs) holds [256, V] logits at most
SMALLEST_SEGMENT = 16  # below this a segment's fixed cost (30 layers' kernels) dominates its tokens'
PREFILL_SHARE = 0.5  # a segment between two decode steps takes about half a step's time
SMOOTHING = 0.2  # weight of the newest measurement in the running averages


class PrefillBudget:
    """Running averages of a decode step's time and of the prefill's tokens per second, and the
    segment size they allow. `observe_*` take measurements; `tokens` gives the next segment's size."""

    def __init__(
        self, share: float = PREFILL_SHARE, smallest: int = SMALLEST_SEGMENT, largest: int = PREFILL_SEGMENT
    ) -> None:
        if not 0 < smallest <= largest:
            raise ValueError("a prefill budget needs 0 < smallest <= largest")
        self.share, self.smallest, self.largest = share, smallest, largest
        self.step_seconds: float | None = None
        self.tokens_per_second: float | None = None

    @staticmethod
    def _average(old: float | None, new: float) -> float:
        return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

    def observe_step(self, seconds: float) -> None:
        """A decode step of the running rows took `seconds`."""
        self.step_seconds = self._average(self.step_seconds, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill segment of `tokens` tokens took `seconds`."""
        if tokens > 0 and seconds > 0:
            self.tokens_per_second = self._average(self.tokens_per_second, tokens / seconds)

    def tokens(self, decoding: bool, prompts: int = 1) -> int:
        """The next segment's size for each of `prompts` prompts being prefilled, while rows are
        decoding (`decoding`) or not. Before anything is measured: the smallest."""
        if not decoding:
            return self.largest
        if self.step_seconds is None or self.tokens_per_second is None:
            return self.smallest
        allowed = self.share * self.step_seconds * self.tokens_per_second / max(1, prompts)
        return int(min(self.largest, max(self.smallest, allowed)))
