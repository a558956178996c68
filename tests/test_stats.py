"""Tests for ablations/stats.py: the rule's false-positive rate and power in simulated studies, and
each step (paired differences, the t interval, pooling, Holm, the text, the detectable ratio)
against a hand calculation."""
import math

import numpy as np
import pytest

from ablations.stats import (compare_table, describe, detectable_ratio, holm, one_difference, paired_differences,
                             pooled_variance)

SEED_SIGMA = 0.3   # lognormal noise that a seed gives every run trained on it (shared: pairing cancels it)
RUN_SIGMA = 0.05   # each run's own lognormal noise
SIGMA_D = math.sqrt(2) * RUN_SIGMA  # the paired log difference's standard deviation


def simulate_table(rng, seeds_per_variant, effects, baseline_seeds=3):
    """One table's paired log differences, made the way a study makes them: a baseline on seeds
    0..baseline_seeds-1 and each variant on its first seeds, every value exp(2 + seed noise + run
    noise + the variant's true log effect), each variant compared with the same baseline runs."""
    seed_noise = rng.normal(0, SEED_SIGMA, baseline_seeds)
    baseline = {s: math.exp(2 + seed_noise[s] + rng.normal(0, RUN_SIGMA)) for s in range(baseline_seeds)}
    differences = {}
    for v, (n, effect) in enumerate(zip(seeds_per_variant, effects)):
        values = {s: math.exp(2 + seed_noise[s] + rng.normal(0, RUN_SIGMA) + effect) for s in range(n)}
        differences[f"v{v}"] = paired_differences(values, baseline)
    return differences


@pytest.mark.parametrize("pool", [True, False])
def test_no_true_effect_keeps_the_family_wise_error_at_5_percent(pool):
    rng = np.random.default_rng(0)
    tables, variants = 2000, 10
    any_significant = significant = 0
    for _ in range(tables):
        differences = simulate_table(rng, rng.integers(2, 4, variants), [0.0] * variants)
        flags = [c.significant for c in compare_table(differences, pool=pool).values()]
        any_significant += any(flags)
        significant += sum(flags)
    # Measured: pooled, 0.032 of tables and 0.0044 of variants; unpooled, 0.0445 and 0.0047. The
    # plain pooled variance (without the block design) gave 0.0625 and 0.0107, and no Holm correction
    # would give about a third of tables. The margin is 2 Monte-Carlo standard errors of a 5% rate.
    assert any_significant / tables <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / tables)
    assert significant / (tables * variants) < 0.01


def test_a_2_sigma_effect_over_5_seeds_is_found_when_pooled():
    rng = np.random.default_rng(1)
    tables, found, false = 1000, 0, 0
    for _ in range(tables):
        differences = simulate_table(rng, [5] * 10, [2 * SIGMA_D] + [0.0] * 9, baseline_seeds=5)
        comparisons = compare_table(differences, pool=True)
        found += describe(comparisons["v0"])[1] == "hurts"
        false += sum(c.significant for v, c in comparisons.items() if v != "v0")
    # Measured: 0.937 of tables find v0 (a t test with 40 degrees of freedom at Holm's first step,
    # 0.005, expects about 0.93); 0.0051 of the null variants are flagged.
    assert found / tables > 0.9
    assert false / (tables * 9) < 0.01


def test_paired_differences_use_only_shared_seeds():
    values, reference = {0: 2.0, 1: 3.0, 2: 5.0}, {1: 1.5, 2: 5.0, 3: 1.0}
    assert paired_differences(values, reference) == pytest.approx({1: math.log(2.0), 2: 0.0})
    assert paired_differences(values, reference, scale="diff") == pytest.approx({1: 1.5, 2: 0.0})
    with pytest.raises(ValueError, match="needs positive values"):
        paired_differences({0: 0.0}, {0: 1.0})


def test_holm_matches_a_hand_calculation():
    # m = 5. Sorted: 0.005 * 5 = 0.025, 0.01 * 4 = 0.04, 0.03 * 3 = 0.09, 0.04 * 2 = 0.08 -> 0.09 (the
    # running maximum keeps the order), 0.5 * 1 = 0.5.
    assert holm([0.01, 0.04, 0.03, 0.005, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # 1.2 is capped at 1, and 0.7 keeps the maximum
    assert holm([]) == []


@pytest.mark.parametrize("pool", [True, False])
def test_the_interval_matches_t_quantile_arithmetic(pool):
    c = compare_table({"a": {0: 0.1, 1: 0.2, 2: 0.3}}, pool=pool)["a"]
    # mean 0.2; sd = sqrt((0.01 + 0 + 0.01) / 2) = 0.1; se = 0.1 / sqrt(3). With 2 degrees of freedom
    # the t distribution has a closed form: the 0.975 quantile is 0.95 / sqrt(2 * 0.975 * 0.025) and
    # the tail beyond t is (1 - t / sqrt(2 + t^2)) / 2.
    se = 0.1 / math.sqrt(3)
    quantile = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    t = 0.2 / se
    assert (c.n, c.df, c.pooled) == (3, 2, pool)
    assert c.mean == pytest.approx(0.2) and c.se == pytest.approx(se)
    assert (c.low, c.high) == pytest.approx((0.2 - quantile * se, 0.2 + quantile * se))
    assert c.p == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert c.p_holm == pytest.approx(c.p) and not c.significant  # p = 0.074
    assert describe(c) == ("x1.22 [0.95, 1.57]", "not significant")


def test_pooling_fits_a_block_design_with_the_reference_as_a_row_of_zeros():
    differences = {"a": {0: 0.1, 1: 0.3}, "b": {0: 0.0, 1: 0.4}, "c": {0: 0.2}}
    # The balanced part (reference, a, b on seeds 0 and 1) by the two-way table's residuals,
    # d - row mean - column mean + grand mean: 0.1, -0.1 (reference), 0, 0 (a), -0.1, 0.1 (b). Their
    # squares sum to 0.04 = sigma^2 * 2 degrees of freedom, so var_d = 2 sigma^2 = 0.04. c's one seed
    # is fitted exactly by its own mean and adds nothing. The plain pooled variance would be
    # (0.02 + 0.08) / 2 = 0.05, counting the reference's noise in a and in b.
    assert pooled_variance(differences) == (pytest.approx(0.04), 2)
    comparisons = compare_table(differences, pool=True)
    for v, n in [("a", 2), ("b", 2), ("c", 1)]:
        c = comparisons[v]
        assert (c.n, c.df, c.pooled) == (n, 2, True)
        assert c.se == pytest.approx(math.sqrt(0.04 / n))
    assert comparisons["c"].low is not None and comparisons["c"].p_holm is not None

    # With a reference each, a's and b's noise is not shared: the plain pooled variance is right.
    assert pooled_variance(differences, {"a": "run 1", "b": "run 2", "c": "run 1"}) == (pytest.approx(0.05), 2)

    unpooled = compare_table(differences, pool=False)
    a, b, c = unpooled["a"], unpooled["b"], unpooled["c"]
    assert (a.se, a.df) == (pytest.approx(math.sqrt(0.02 / 2)), 1)
    assert (b.se, b.df) == (pytest.approx(math.sqrt(0.08 / 2)), 1)
    assert (c.df, c.se, c.low, c.high, c.p, c.p_holm, c.significant) == (0, None, None, None, None, None, False)
    assert describe(c) == ("x1.22 (no interval)", "no verdict")
    assert [a.p_holm, b.p_holm] == pytest.approx(holm([a.p, b.p]))  # Holm counts only the variants with a p


def test_describe_reads_the_direction_and_the_interval():
    ratio_08 = {s: math.log(0.8) + e for s, e in enumerate((0.01, -0.01, 0.0, 0.02, -0.02))}
    comparisons = compare_table({"faster": ratio_08, "same": {0: 0.1, 1: -0.1, 2: 0.05}})
    text, verdict = describe(comparisons["faster"])
    assert comparisons["faster"].significant and text.startswith("x0.80 [") and verdict == "helps"
    assert describe(comparisons["faster"], lower_is_better=False)[1] == "hurts"
    same = comparisons["same"]
    assert math.exp(same.low) < 1 < math.exp(same.high) and describe(same)[1] == "not significant"

    recall = compare_table({"v": {0: 0.05, 1: 0.06, 2: 0.04, 3: 0.05}}, scale="diff")["v"]
    assert describe(recall, lower_is_better=False) == ("+0.050 [+0.037, +0.063]", "helps")


def test_detectable_ratio():
    # (z(0.975) + z(0.8)) * 0.1 / sqrt(5) = (1.959964 + 0.841621) * 0.044721 = 0.125291.
    assert detectable_ratio(0.1, 5) == pytest.approx(math.exp(0.125291), rel=1e-5)
    ratios = [detectable_ratio(0.1, n) for n in (2, 3, 5, 10)]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 1
    assert detectable_ratio(0.05, 5) < detectable_ratio(0.1, 5) < detectable_ratio(0.2, 5)


def test_kinds_pool_apart_and_holm_spans_the_table():
    """A re-evaluation (one network, two samplers) is far less noisy than a training change: pooled
    together, the training changes' noise would hide its effect; pooled by kind, it is found."""
    training = {"t1": {0: 0.3, 1: -0.3}, "t2": {0: -0.2, 1: 0.25}}
    resampled = {"r": {0: 0.101, 1: 0.099, 2: 0.100}}
    mixed = compare_table({**training, **resampled})
    assert not mixed["r"].significant
    kinds = {"t1": "training", "t2": "training", "r": "re-evaluation"}
    apart = compare_table({**training, **resampled}, kinds=kinds)
    assert apart["r"].significant and apart["r"].se < mixed["r"].se / 10
    assert (apart["t1"].se, apart["t1"].df) == (pytest.approx(math.sqrt(pooled_variance(training)[0] / 2)), 2)
    # Holm counts all three p-values, not only those of one kind.
    assert [apart[v].p_holm for v in ("t1", "t2", "r")] == pytest.approx(holm([apart[v].p for v in ("t1", "t2", "r")]))


def test_the_studys_own_design_keeps_the_family_wise_error_at_5_percent():
    """The design as the study runs it: a 5-seed baseline, every variant on 2 of its seeds, pooled."""
    rng = np.random.default_rng(2)
    tables = 2000
    any_significant = sum(any(c.significant for c in compare_table(
        simulate_table(rng, [2] * 10, [0.0] * 10, baseline_seeds=5), pool=True).values()) for _ in range(tables))
    assert any_significant / tables <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / tables)


def test_the_detectable_ratio_by_the_t_tests_exact_power():
    """With few degrees of freedom the t test needs a larger change than the normal approximation says;
    at the ratio it returns, a simulated paired t test finds the change 80% of the time."""
    sigma, n, df = 0.17, 2, 5
    exact, normal = detectable_ratio(sigma, n, df=df), detectable_ratio(sigma, n)
    assert exact > normal and detectable_ratio(sigma, n, df=10_000) == pytest.approx(normal, rel=2e-3)
    assert detectable_ratio(sigma, n, alpha=0.01, df=df) > exact
    rng = np.random.default_rng(3)
    from scipy import stats as scipy_stats
    trials, found = 4000, 0
    critical = scipy_stats.t.ppf(0.975, df)
    for _ in range(trials):
        mean = rng.normal(math.log(exact), sigma / math.sqrt(n))
        se = sigma / math.sqrt(n) * math.sqrt(rng.chisquare(df) / df)
        found += abs(mean) / se > critical
    assert found / trials == pytest.approx(0.8, abs=0.03)


def test_one_difference_takes_its_noise_from_elsewhere():
    """A single paired difference with a pooled sigma: d +- t(0.975, df) * sigma (t = 2.228 at 10
    degrees of freedom), significant where that interval leaves 0."""
    c = one_difference("v", 0.5, 0.1, 10)
    assert (c.n, c.df, c.se) == (1, 10, 0.1)
    assert abs(c.low - (0.5 - 0.2228)) < 1e-3 and abs(c.high - (0.5 + 0.2228)) < 1e-3 and c.significant
    assert not one_difference("v", 0.2, 0.1, 10).significant  # 0.2 < 0.2228


def test_a_variant_that_reran_the_reference_bit_for_bit_is_left_out_of_the_pool_and_of_holm():
    """ema_0.9999 at the cpu scale: a decay the EMA's warm-up never reaches, so its runs are the
    baseline's. Its rows of zeros must not shrink the pooled noise, nor count as a test."""
    rng = np.random.default_rng(4)
    table = {f"v{i}": {s: float(d) for s, d in enumerate(rng.normal(0.1 * i, SIGMA_D, 2))} for i in range(4)}
    without = compare_table(table)
    with_same = compare_table({**table, "same": {0: 0.0, 1: 0.0}})
    assert pooled_variance({**table, "same": {0: 0.0, 1: 0.0}})[1] == pooled_variance(table)[1] + 1  # it would add a df
    for v in table:
        assert with_same[v].se == pytest.approx(without[v].se) and with_same[v].df == without[v].df
        assert with_same[v].p_holm == pytest.approx(without[v].p_holm)
        assert not with_same[v].identical
    same = with_same["same"]
    assert same.identical and same.mean == 0 and same.p_holm == 1.0 and not same.significant
    assert describe(same) == ("x1.00 (the same runs, bit for bit)", "not significant")
