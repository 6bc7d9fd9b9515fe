"""The network a time budget buys: units, layers and dropout from the corpus size and the measured step speed.

The rule (docs/training.md#the-sizing-rule):

1. Two probe networks (``PROBES``) train a few steps each; a line through
   their seconds per step against their multiply-adds per token estimates
   every candidate's (a step has a fixed cost too: on two CPU cores a
   2 x 512 step takes under twice a 2 x 256 one, not 3.4 times).
2. The budget's training time over that step time gives the tokens a
   candidate would read, ``T``; its parameters are ``P``.
3. The largest candidate with ``T >= TOKENS_PER_PARAMETER * P`` wins (the
   smallest candidate when none qualifies): a larger network learns more per
   token but reads fewer of them.
4. Dropout grows with the passes over the corpus ``T / N``: a corpus read many
   times over is memorised unless the network is regularised.
"""

from __future__ import annotations

from dataclasses import dataclass

# (layers, units), smallest to largest; the embedding is 64 wide throughout.
CANDIDATES: tuple[tuple[int, int], ...] = (
    (1, 128),
    (1, 256),
    (2, 256),
    (2, 320),
    (2, 384),
    (2, 512),
    (2, 640),
    (2, 768),
    (3, 768),
    (3, 1024),
)
PROBES = ((2, 256), (2, 512))
EMBEDDING_DIM = 64
TOKENS_PER_PARAMETER = 8.0
# (passes over the corpus at or above which, dropout), highest first.
DROPOUT_BY_PASSES: tuple[tuple[float, float], ...] = ((16.0, 0.3), (4.0, 0.2), (1.5, 0.1), (0.0, 0.0))


def lstm_parameters(layers: int, units: int, vocab: int, embedding_dim: int = EMBEDDING_DIM) -> int:
    """Weights of Embedding -> ``layers`` x LSTM(``units``) -> Dense(vocab)."""
    total = vocab * embedding_dim
    width = embedding_dim
    for _ in range(layers):
        total += 4 * units * (width + units + 1)
        width = units
    return total + units * vocab + vocab


def macs_per_token(layers: int, units: int, vocab: int, embedding_dim: int = EMBEDDING_DIM) -> int:
    """Multiply-adds of one token through the network (the embedding is a lookup)."""
    return lstm_parameters(layers, units, vocab, embedding_dim) - vocab * embedding_dim


@dataclass(frozen=True)
class Choice:
    layers: int
    units: int
    embedding_dim: int
    dropout: float
    parameters: int
    est_step_s: float
    est_tokens: float  # tokens the training time reads at the estimated step time
    passes: float  # est_tokens over the training tokens of the corpus

    def reason(self) -> str:
        return (
            f"{self.layers} x LSTM {self.units}: {self.parameters / 1e6:.2f} M parameters, about "
            f"{self.est_tokens / 1e6:.1f} M tokens in the budget ({self.est_tokens / self.parameters:.0f} per "
            f"parameter, rule >= {TOKENS_PER_PARAMETER:g}), {self.passes:.1f} passes over the corpus -> dropout "
            f"{self.dropout:g}"
        )


def dropout_for(passes: float) -> float:
    for threshold, dropout in DROPOUT_BY_PASSES:
        if passes >= threshold:
            return dropout
    return 0.0


def step_estimate(vocab: int, probe_step_s: tuple[float, float]) -> tuple[float, float]:
    """(fixed seconds, seconds per multiply-add) of a step, from the two probes' measured times."""
    (m0, m1) = (macs_per_token(*p, vocab) for p in PROBES)
    slope = (probe_step_s[1] - probe_step_s[0]) / (m1 - m0)
    if slope <= 0.0:  # noise made the larger probe look faster: scale the mean by multiply-adds
        return 0.0, (probe_step_s[0] + probe_step_s[1]) / (m0 + m1)
    return max(0.0, probe_step_s[0] - slope * m0), slope


def choose(
    *,
    vocab: int,
    corpus_tokens: int,
    train_s: float,
    probe_step_s: tuple[float, float],
    tokens_per_step: int,
) -> Choice:
    """Apply the rule to the probes' measured seconds per step at ``tokens_per_step`` (batch x seq_len)."""
    fixed, slope = step_estimate(vocab, probe_step_s)
    best: Choice | None = None
    for layers, units in CANDIDATES:
        step_s = fixed + slope * macs_per_token(layers, units, vocab)
        tokens = train_s / step_s * tokens_per_step
        params = lstm_parameters(layers, units, vocab)
        passes = tokens / max(1, corpus_tokens)
        choice = Choice(layers, units, EMBEDDING_DIM, dropout_for(passes), params, step_s, tokens, passes)
        if best is None or tokens >= TOKENS_PER_PARAMETER * params:
            best = choice
    assert best is not None
    return best
