"""The sizing rule: a budget buys a network by tokens per parameter, and dropout by passes over the corpus."""

from __future__ import annotations

import pytest

from training import sizing
from training.model import ModelConfig, build_model


@pytest.mark.parametrize("layers,units,vocab", [(1, 16, 40), (2, 64, 105), (3, 32, 500)])
def test_the_parameter_count_is_the_models(layers: int, units: int, vocab: int) -> None:
    model = build_model(ModelConfig(vocab_size=vocab, embedding_dim=sizing.EMBEDDING_DIM, units=units, layers=layers))
    assert sizing.lstm_parameters(layers, units, vocab) == model.count_params()


def _choose(train_s: float, corpus_tokens: int = 440_000) -> sizing.Choice:
    return sizing.choose(
        vocab=105, corpus_tokens=corpus_tokens, train_s=train_s, probe_step_s=(0.3, 0.5), tokens_per_step=6400
    )


def test_more_time_buys_a_larger_network_that_still_reads_enough_tokens_per_parameter() -> None:
    sizes = [_choose(t) for t in (60, 600, 1800, 7200, 72_000)]
    params = [c.parameters for c in sizes]
    assert params == sorted(params) and params[0] < params[-1]
    for c in sizes[1:]:
        assert c.est_tokens >= sizing.TOKENS_PER_PARAMETER * c.parameters
    assert (sizes[0].layers, sizes[0].units) == sizing.CANDIDATES[0]  # nothing qualifies: the smallest


def test_the_chosen_network_is_the_largest_that_qualifies() -> None:
    c = _choose(1800)
    i = sizing.CANDIDATES.index((c.layers, c.units))
    if i + 1 < len(sizing.CANDIDATES):
        layers, units = sizing.CANDIDATES[i + 1]
        bigger = sizing.lstm_parameters(layers, units, 105)
        fixed, slope = sizing.step_estimate(105, (0.3, 0.5))
        step = fixed + slope * sizing.macs_per_token(layers, units, 105)
        assert 1800 / step * 6400 < sizing.TOKENS_PER_PARAMETER * bigger


def test_dropout_rises_with_the_passes_over_the_corpus() -> None:
    small_corpus = _choose(1800, corpus_tokens=400_000)
    large_corpus = _choose(1800, corpus_tokens=40_000_000)
    assert small_corpus.passes > large_corpus.passes
    assert small_corpus.dropout > large_corpus.dropout
    assert sizing.dropout_for(0.5) == 0.0 and sizing.dropout_for(100) == max(d for _, d in sizing.DROPOUT_BY_PASSES)
    assert "passes over the corpus" in small_corpus.reason()


def test_the_step_estimate_passes_through_both_probes() -> None:
    fixed, slope = sizing.step_estimate(105, (0.3, 0.5))
    for (layers, units), seconds in zip(sizing.PROBES, (0.3, 0.5), strict=True):
        assert fixed + slope * sizing.macs_per_token(layers, units, 105) == pytest.approx(seconds)
    fixed, slope = sizing.step_estimate(105, (0.5, 0.4))  # noise: the larger probe looked faster
    assert fixed == 0.0 and slope > 0
