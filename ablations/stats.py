"""The study's statistics: is a variant's change against its reference larger than run-to-run noise?
The whole rule is here, in four steps and a fifth for single runs.

1. Paired differences. A variant and its reference (the baseline; for a re-evaluation the run it
   re-evaluates; on the path the row above) are trained on the same seeds, so they are compared seed by seed. For a positive
   metric (attribute FD, SWD) the difference is d_s = log(variant_s) - log(reference_s), and the
   report shows the ratio exp(mean d). For a metric in [0, 1] (precision, recall) it is the plain
   difference d_s = variant_s - reference_s. Pairing cancels the noise that two runs share through
   their seed (the data order, the initialisation).
2. A 95% interval for the mean difference, from Student's t: mean +- t(0.975, df) * se, with
   se = sqrt(var_d / n) over the variant's n shared seeds. Unpooled, var_d is the variant's own
   sample variance of d, with n - 1 degrees of freedom. With 2 or 3 seeds that is a poor estimate,
   so by default var_d is pooled over the variants of one table, which are assumed to be equally
   noisy. Not as the plain pooled variance sum_v sum_s (d_vs - mean_v)^2 / sum_v (n_v - 1), though:
   the variants share their reference's runs, so that sum counts the reference's noise once per
   variant and its tests find false effects too often (in 6.3% of simulated tables with no effect,
   where at most 5% are allowed: tests/test_stats.py). Instead the differences are fitted as a
   randomized block design (Fisher; a two-way analysis of variance) whose blocks are the reference's
   runs: d_vs = mu_v + beta_s + eps, with the reference itself as a row of zeros. Its residual
   variance sigma^2 is one run's noise, var_d = 2 sigma^2, and it has sum_v (n_v - 1) degrees of
   freedom, as the plain sum has. A variant with a single shared seed gets an interval only when
   pooled. Pool only comparisons of one kind: a re-evaluation's differences (one network, two
   samplers) are much less noisy than a training change's. A variant whose differences are all
   exactly 0 ran its reference's runs again, bit for bit (a change that does nothing at this budget,
   like an EMA decay that its warm-up never reaches): it measured no noise, so it is left out of the
   pool, where its rows of zeros would shrink the noise, and out of Holm's family, since it tests
   nothing (`identical`).
3. Many variants. With 10 variants each tested at 5%, about 40% of tables would show a false
   effect. So each variant's two-sided p-value (the t test of mean d = 0) is adjusted by Holm's
   step-down method (Holm 1979, "A simple sequentially rejective multiple test procedure"), which
   keeps the chance of any false "significant" in a table (the family-wise error) at most 5%,
   whatever the dependence between the variants. A variant is significant when its adjusted p is
   below 0.05. The interval is not widened: it is the plain 95% interval, so it can exclude 1 while
   the verdict, which is the adjusted one, is "not significant".
4. Power. detectable_ratio says how large a true change n seeds find with 80% power (by the t test's
   exact power at the pooled degrees of freedom), so a report can say which changes it could not
   have seen.
5. A single run (one_difference), as in a check at a longer budget on one seed: its one paired
   difference gets the interval of step 2 with sigma taken from a table where seeds were paired,
   an assumption the report states, and no correction.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05  # the family-wise error of a table; the intervals cover 1 - ALPHA
DIFFERENCE_SCALES = ("log", "diff")


@dataclass(frozen=True)
class Comparison:
    """One variant against its reference on one metric. mean, low and high are on the scale of d (a
    log ratio, or a plain difference); describe() shows them as a ratio. se, low, high, p and p_holm
    are None when there is no variance to judge by (df = 0)."""
    variant: str
    n: int                # seeds shared with the reference
    mean: float           # mean paired difference
    se: float | None      # its standard error
    df: int               # degrees of freedom of se
    low: float | None     # the unadjusted 95% interval for the mean
    high: float | None
    p: float | None       # two-sided p-value of mean = 0
    p_holm: float | None  # p adjusted by Holm over the table
    significant: bool     # p_holm < ALPHA
    pooled: bool          # se comes from the table's pooled variance
    scale: str            # "log" or "diff"
    identical: bool = False  # every difference is exactly 0: the reference's runs, bit for bit


def paired_differences(values, reference, scale="log"):
    """{seed: d_s} for each seed in both {seed: value} mappings: log(values[s]) - log(reference[s]) on
    the "log" scale, values[s] - reference[s] on the "diff" scale."""
    if scale not in DIFFERENCE_SCALES:
        raise ValueError(f"scale {scale!r} is not one of {DIFFERENCE_SCALES}")
    seeds = [s for s in values if s in reference]
    if scale == "diff":
        return {s: values[s] - reference[s] for s in seeds}
    if any(values[s] <= 0 or reference[s] <= 0 for s in seeds):
        raise ValueError("the log scale needs positive values; use scale='diff' for a metric that can be 0")
    return {s: math.log(values[s]) - math.log(reference[s]) for s in seeds}


def pooled_variance(differences, references=None):
    """(var_d, degrees of freedom): the variance of one paired difference, pooled over a table's
    {variant: {seed: d_s}} by the randomized block design of step 2 (var_d is None with no degree of
    freedom). references: {variant: the run it was compared with}, for a table whose variants have
    different references (re-evaluations of two runs); None when they all have one."""
    references = references or {}
    variants = list(differences)
    blocks = list(dict.fromkeys((references.get(v), s) for v in variants for s in differences[v]))
    cells = [(None, block, 0.0) for block in blocks]  # the reference's own row: d = 0
    cells += [(v, (references.get(v), s), d) for v in variants for s, d in differences[v].items()]
    X = np.zeros((len(cells), len(variants) + len(blocks)))  # mu_v, then beta of each block
    for i, (v, block, _) in enumerate(cells):
        X[i, len(variants) + blocks.index(block)] = 1
        if v is not None:
            X[i, variants.index(v)] = 1
    y = np.array([d for _, _, d in cells])
    fit, _, rank, _ = np.linalg.lstsq(X, y, rcond=None)
    residual = y - X @ fit
    df = len(cells) - int(rank)
    return (2 * float(residual @ residual) / df if df else None), df


def compare_table(differences, scale="log", pool=True, references=None, kinds=None):
    """{variant: {seed: d_s}} for the variants of one table (the reference itself left out) ->
    {variant: Comparison}, by steps 2 and 3 of the rule; references as for pooled_variance. kinds:
    {variant: its kind of comparison} (a training change, a re-evaluation): the variance is pooled
    within a kind only, while Holm's correction spans the whole table. A variant with no shared seed
    is left out."""
    if scale not in DIFFERENCE_SCALES:
        raise ValueError(f"scale {scale!r} is not one of {DIFFERENCE_SCALES}")
    differences = {v: dict(d) for v, d in differences.items() if len(d)}
    identical = {v for v, d in differences.items() if not any(d.values())}
    kind = {v: (kinds or {}).get(v) for v in differences}
    pooled = {k: pooled_variance({v: d for v, d in differences.items() if kind[v] == k and v not in identical}
                                 or {v: d for v, d in differences.items() if kind[v] == k}, references)
              for k in set(kind.values())} if pool else None
    tests = {}  # variant: (mean, se, df, low, high, p)
    for v, d in differences.items():
        n, mean = len(d), sum(d.values()) / len(d)
        own = (sum((x - mean) ** 2 for x in d.values()) / (n - 1) if n > 1 else None, n - 1)
        var_d, df = pooled[kind[v]] if pool else own
        if not df:
            tests[v] = (mean, None, 0, None, None, None)
            continue
        se = math.sqrt(var_d / n)
        half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
        t = abs(mean) / se if se > 0 else (math.inf if mean else 0.0)
        tests[v] = (mean, se, df, mean - half, mean + half, float(2 * stats.t.sf(t, df)))

    tested = [v for v in differences if tests[v][-1] is not None and v not in identical]
    p_holm = dict(zip(tested, holm([tests[v][-1] for v in tested])))
    p_holm.update({v: tests[v][-1] for v in identical if tests[v][-1] is not None})  # 1: the mean is 0
    return {v: Comparison(v, len(d), *tests[v], p_holm.get(v), p_holm.get(v, 1.0) < ALPHA, pool, scale, v in identical)
            for v, d in differences.items()}


def holm(p_values):
    """Holm's step-down adjustment (Holm 1979): sort the m p-values, multiply the k-th smallest by
    m - k + 1, cap at 1, and carry the running maximum so that the order is kept. Rejecting where the
    adjusted p < alpha keeps the family-wise error at most alpha. Returns them in the given order."""
    m = len(p_values)
    adjusted, running = [None] * m, 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def detectable_ratio(sigma, n, alpha=ALPHA, power=0.8, df=None):
    """The smallest true ratio exp(delta) that n paired seeds detect with this power at this two-sided
    alpha, when the paired log differences have standard deviation sigma (the square root of
    pooled_variance's var_d). With df (the degrees of freedom of the test's variance), by the t
    test's exact power: the noncentral t distribution with noncentrality delta / (sigma / sqrt(n)).
    Without, the normal approximation delta = (z(1 - alpha/2) + z(power)) * sigma / sqrt(n), which is
    optimistic with few degrees of freedom. For Holm's strictest step pass alpha / the number of
    variants. A fall to 1 / ratio is detected as well."""
    se = sigma / math.sqrt(n)
    if df is None:
        return math.exp(float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)
    critical = float(stats.t.ppf(1 - alpha / 2, df))

    def shortfall(nc):  # the power at noncentrality nc = delta / se, less the power asked for
        wrong_side = np.nan_to_num(stats.nct.cdf(-critical, df, nc))  # scipy gives NaN where it is about 0
        return float(stats.nct.sf(critical, df, nc) + wrong_side) - power
    high = 1.0
    while shortfall(high) < 0:  # a bracket for the root, within the noncentralities scipy computes well
        high *= 2
        if high > 64:
            return math.inf
    return math.exp(optimize.brentq(shortfall, 0.0, high) * se)


def one_difference(variant, d, sigma, df, scale="log"):
    """A Comparison for a single paired difference d, whose standard deviation sigma (with df degrees
    of freedom) comes from elsewhere: a table's pooled variance, where the one seed gives none. Its
    interval and p assume that noise; it is not corrected for any other test."""
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * sigma
    p = float(2 * stats.t.sf(abs(d) / sigma, df))
    return Comparison(variant, 1, d, sigma, df, d - half, d + half, p, p, p < ALPHA, True, scale)


def describe(c, lower_is_better=True):
    """(text, verdict) for the report. text: "x1.32 [1.10, 1.58]" on the log scale (the ratio and its
    interval), "+0.031 [+0.010, +0.052]" on the diff scale, "(no interval)" without one. verdict:
    "helps" or "hurts" when significant (lower_is_better says which direction helps), "no verdict"
    without an interval (one seed and nothing to pool with), else "not significant"; for an identical
    variant the text says so in place of the interval."""
    show = (lambda x: f"{math.exp(x):.2f}") if c.scale == "log" else (lambda x: f"{x:+.3f}")
    text = ("x" if c.scale == "log" else "") + show(c.mean)
    if c.identical:
        return text + " (the same runs, bit for bit)", "not significant"
    text += f" [{show(c.low)}, {show(c.high)}]" if c.low is not None else " (no interval)"
    if c.low is None:
        return text, "no verdict"
    if not c.significant:
        return text, "not significant"
    return text, "helps" if (c.mean < 0) == lower_is_better else "hurts"
