"""Paired comparisons over seeds: the statistics that decide whether A beats B.

Two configurations A and B trained with the same seeds are paired by seed (same data order, same
labelled subset, same initial draws), so the comparison is on the per-seed differences
``d_s = A_s - B_s`` and seed-to-seed noise common to both cancels. For one pair, :func:`compare` gives

- the mean difference with its t-based 95% confidence interval;
- the paired t test, and beside it Wilcoxon's signed-rank test and the exact sign test (with 2-5
  seeds they can rarely reject: their smallest two-sided p-values are 2 / 2**n);
- the minimal detectable effect (MDE): the difference this design (n seeds, the observed paired
  std) detects with 80% power at alpha 0.05 two-sided, from the noncentral t (:func:`mde`).

:func:`compare_frame` does it for every cell of a table and corrects the p-values across those cells
(:func:`adjust`: Holm by default, or Benjamini-Hochberg); the decision is the adjusted p of the t test.
:func:`reading` says it in one of three sentences. :func:`bootstrap` counts test-set noise too: it
resamples seeds and, within each seed, test samples (the same indices for A and B), from per-sample
predictions. :func:`seeds_needed` sizes an experiment.

Which way a metric goes (lower MAE is better, higher accuracy is better) is ``mskt.metrics``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as sps

from mskt.errors import MsktError
from mskt.metrics import compute_metrics, display_scale, higher_is_better

ALPHA = 0.05
POWER = 0.8
METHODS = ("holm", "bh", "none")

__all__ = [
    "StatsError", "Comparison", "compare", "compare_frame", "comparisons_markdown", "adjust", "power", "mde",
    "seeds_needed", "reading", "bootstrap", "metric_function", "ALPHA", "POWER", "METHODS",
]


class StatsError(MsktError):
    """A comparison that cannot be made as asked (too few seeds, unpaired or non-finite values)."""


# ----------------------------------------------------------------------------------------------
# Power and the minimal detectable effect of a paired t test


def _check_design(n: int, alpha: float, target: float | None = None) -> None:
    if int(n) != n or n < 2:
        raise StatsError(f"a paired t test needs at least 2 seeds, got n={n!r}")
    if not 0 < alpha < 1:
        raise StatsError(f"alpha={alpha!r}: expected a number in (0, 1)")
    if target is not None and not alpha < target < 1:
        raise StatsError(f"power={target!r}: expected a number in (alpha={alpha}, 1)")


def _power_standardized(effect_size: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t test for an effect of ``effect_size`` paired stds."""
    df = n - 1
    crit = sps.t.ppf(1 - alpha / 2, df)
    nc = abs(effect_size) * math.sqrt(n)  # the noncentrality: effect / (sd / sqrt(n))
    upper, lower = float(sps.nct.sf(crit, df, nc)), float(sps.nct.cdf(-crit, df, nc))
    if not math.isfinite(lower):  # scipy's nct gives NaN far in the tail; it is below P(T < 0) = Phi(-nc) there
        lower = float(sps.norm.cdf(-nc))
    if not math.isfinite(upper):  # and fails for thousands of seeds, where t is normal anyway
        upper = float(sps.norm.sf(crit - nc))
    return upper + lower


def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """The probability that a paired t test on ``n`` seeds (two-sided, level ``alpha``) rejects when the
    true mean difference is ``effect`` and the std of the per-seed differences is ``sd``."""
    _check_design(n, alpha)
    if not sd >= 0:
        raise StatsError(f"sd={sd!r}: expected a std >= 0")
    if sd == 0:  # no noise: any nonzero effect is seen, and none is invented
        return 1.0 if effect != 0 else alpha
    return _power_standardized(effect / sd, int(n), alpha)


@functools.lru_cache(maxsize=4096)
def _mde_standardized(n: int, alpha: float, target: float) -> float:
    """The effect, in paired stds, that n seeds detect with power ``target``: the root of power(d) = target."""
    hi = 1.0
    while _power_standardized(hi, n, alpha) < target:  # power rises with d from alpha at d=0 to 1
        hi *= 2
    return float(optimize.brentq(lambda d: _power_standardized(d, n, alpha) - target, 0.0, hi, xtol=1e-10))


def mde(sd: float, n: int, alpha: float = ALPHA, target_power: float = POWER) -> float:
    """The minimal detectable effect: the smallest true mean difference that a two-sided paired t test
    on ``n`` seeds detects with probability ``target_power`` at level ``alpha``, when the per-seed
    differences have std ``sd`` (the noncentral t, solved for the effect; 0 when ``sd`` is 0)."""
    _check_design(n, alpha, target_power)
    if not sd >= 0:
        raise StatsError(f"sd={sd!r}: expected a std >= 0")
    return float(sd) * _mde_standardized(int(n), float(alpha), float(target_power))


def seeds_needed(target_mde: float, sd: float, alpha: float = ALPHA, target_power: float = POWER,
                 max_seeds: int = 10_000) -> int:
    """The fewest seeds whose paired t test detects a difference of ``target_mde`` (with power
    ``target_power`` at level ``alpha``) when the per-seed differences have std ``sd``: use the paired
    std of a pilot (``Comparison.sd``) to size an experiment."""
    if not target_mde > 0:
        raise StatsError(f"target_mde={target_mde!r}: expected an effect > 0")
    if sd == 0:
        return 2
    if mde(sd, max_seeds, alpha, target_power) > target_mde:
        raise StatsError(f"even {max_seeds} seeds do not detect {target_mde:g} with paired std {sd:g}")
    lo, hi = 2, max_seeds  # the MDE falls with n: the first n with mde <= target, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if mde(sd, mid, alpha, target_power) <= target_mde:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ----------------------------------------------------------------------------------------------
# One paired comparison


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of A and B on one metric over ``n`` seeds; ``delta`` = mean(A - B) in the
    metric's units. ``p_adj`` is the t test's p-value after the correction ``method`` across the
    cells of one table (``p_t`` itself when the comparison stands alone)."""

    a: str
    b: str
    metric: str
    n: int
    mean_a: float
    mean_b: float
    delta: float
    ci_lo: float
    ci_hi: float
    sd: float  # std of the per-seed differences (ddof 1)
    t: float
    p_t: float
    p_wilcoxon: float
    p_sign: float
    mde: float
    p_adj: float
    method: str = "none"
    alpha: float = ALPHA

    @property
    def better(self) -> str | None:
        """The name of the better configuration when the adjusted p is below alpha, else None."""
        if not self.p_adj < self.alpha or self.delta == 0:
            return None
        a_higher = self.delta > 0
        return self.a if a_higher == higher_is_better(self.metric) else self.b

    def reading(self) -> str:
        return reading(self)


def _differences(a, b, where: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise StatsError(f"{where}: A and B need one value per seed, paired (same length); got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StatsError(f"{where}: non-finite values (A {a.tolist()}, B {b.tolist()})")
    if a.size < 2:
        raise StatsError(f"{where}: a paired comparison needs at least 2 seeds, got {a.size}")
    return a, b


def compare(a, b, metric: str, names=("A", "B"), alpha: float = ALPHA) -> Comparison:
    """Compare ``a`` and ``b``, the values of ``metric`` of two configurations at the same seeds (in
    the same order): mean difference a - b with its t-based CI, the paired t, Wilcoxon signed-rank and
    exact sign tests, and the MDE at 80% power. Fewer than 2 seeds is a one-line error."""
    where = f"{names[0]} vs {names[1]} on {metric}"
    a, b = _differences(a, b, where)
    d = a - b
    n = d.size
    delta = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(delta)):  # every seed gives the same difference (up to rounding)
        sd = 0.0
        t = 0.0 if delta == 0 else math.copysign(math.inf, delta)
        p_t = 1.0 if delta == 0 else 0.0
        lo = hi = delta
    else:
        se = sd / math.sqrt(n)
        t = delta / se
        p_t = float(2 * sps.t.sf(abs(t), n - 1))
        half = float(sps.t.ppf(1 - alpha / 2, n - 1)) * se
        lo, hi = delta - half, delta + half
    nonzero = d[d != 0]
    if nonzero.size == 0:
        p_w = p_s = 1.0
    else:
        with warnings.catch_warnings():  # few seeds, ties: scipy warns and falls back to its normal approximation
            warnings.simplefilter("ignore")
            p_w = float(sps.wilcoxon(nonzero).pvalue)
        p_s = float(sps.binomtest(int((nonzero > 0).sum()), int(nonzero.size), 0.5).pvalue)
    return Comparison(a=str(names[0]), b=str(names[1]), metric=metric, n=int(n), mean_a=float(a.mean()),
                      mean_b=float(b.mean()), delta=delta, ci_lo=float(lo), ci_hi=float(hi), sd=sd, t=float(t),
                      p_t=p_t, p_wilcoxon=p_w, p_sign=p_s, mde=mde(sd, n, alpha), p_adj=p_t, alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Many comparisons: one table's cells, corrected together


def adjust(pvalues, method: str = "holm") -> np.ndarray:
    """p-values adjusted for testing them together: ``"holm"`` (family-wise error, the default),
    ``"bh"`` (Benjamini-Hochberg false discovery rate) or ``"none"``."""
    if method not in METHODS:
        raise StatsError(f"correction method {method!r}: expected one of {', '.join(METHODS)}")
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise StatsError(f"adjust: expected a flat list of p-values, got shape {p.shape}")
    if p.size and not ((p >= 0) & (p <= 1)).all():  # also refuses NaN
        raise StatsError(f"adjust: p-values must lie in [0, 1], got {p.tolist()}")
    if method == "none" or p.size == 0:
        return p.copy()
    if method == "bh":
        return np.asarray(sps.false_discovery_control(p, method="bh"), dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    # Holm: the k-th smallest (k = 0..m-1) times (m - k), made monotone, capped at 1
    steps = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(steps, 1.0)
    return out


def compare_frame(frame, pairs, metrics, cells=(), label: str = "label", seed: str = "seed",
                  method: str = "holm", alpha: float = ALPHA):
    """Paired comparisons for every cell of a table, corrected together.

    ``frame``: one row per (cell, label, seed) with a column per metric; a configuration measured
    several times at one seed (e.g. over mask seeds) must be averaged first, or it is an error (a run
    counted twice is not two seeds). ``pairs``: [(A label, B label), ...]; ``metrics``: column names;
    ``cells``: the columns that name a cell (e.g. ("condition",)). A and B are paired on ``seed``
    (seeds present in both). Every (cell, pair, metric) is one test; the t tests' p-values are
    adjusted together by ``method``. Returns one row per test: the cell columns, a, b, metric, n and
    the fields of :class:`Comparison`, ``better`` (a label, or "") and ``reading``. A pair with fewer
    than 2 common seeds is not tested (its reading says so; it is left out of the correction)."""
    import pandas as pd

    cells, metrics = list(cells), [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [c for c in [label, seed, *cells, *metrics] if c not in frame.columns]
    if missing:
        raise StatsError(f"compare_frame: the frame has no column(s) {missing}; it has {list(frame.columns)}")
    twice = frame.duplicated([*cells, label, seed])
    if twice.any():
        row = frame.loc[twice, [*cells, label, seed]].iloc[0].to_dict()
        raise StatsError(f"compare_frame: {row} appears more than once; average repeated evaluations of a run "
                         "(e.g. over mask seeds) first, so that each seed counts once")
    groups = frame.groupby(cells, sort=False) if cells else [((), frame)]
    rows, results = [], []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        for a, b in pairs:
            for m in metrics:
                va = part.loc[part[label] == a].set_index(seed)[m]
                vb = part.loc[part[label] == b].set_index(seed)[m]
                if va.empty or vb.empty:
                    continue  # this configuration was not run in this cell
                common = [s for s in va.index if s in vb.index]
                row = {**dict(zip(cells, key)), "a": a, "b": b, "metric": m, "n": len(common)}
                if len(common) < 2:
                    row["reading"] = f"not tested: {len(common)} common seed(s) (a paired comparison needs at least 2)"
                    rows.append(row)
                    results.append(None)
                    continue
                results.append(compare(va.loc[common].to_numpy(), vb.loc[common].to_numpy(), m, (a, b), alpha))
                rows.append(row)
    tested = [i for i, r in enumerate(results) if r is not None]
    adjusted = adjust([results[i].p_t for i in tested], method)
    for i, p in zip(tested, adjusted):
        c = dataclasses.replace(results[i], p_adj=float(p), method=method)
        rows[i].update({f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in ("a", "b", "metric", "n")})
        rows[i]["better"] = c.better or ""
        rows[i]["reading"] = reading(c)
    columns = [*cells, "a", "b", "metric", "n"] + [f.name for f in dataclasses.fields(Comparison)
                                                   if f.name not in ("a", "b", "metric", "n")] + ["better", "reading"]
    return pd.DataFrame(rows, columns=columns)


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def comparisons_markdown(table, cells=()) -> str:
    """A Markdown table of :func:`compare_frame`'s rows: the cell, A vs B, the metric, seeds, the mean
    difference A - B with its 95% CI, the three p-values, the adjusted p, the MDE and the reading
    (accuracies and F1 in points)."""
    cells = list(cells)
    head = cells + ["A vs B", "metric", "seeds", "A − B [95% CI]", "p t", "p Wilcoxon", "p sign", "adjusted p", "MDE", "reading"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        scale, digits = display_scale(r["metric"])
        lead = [str(r[c]) for c in cells] + [f"{r['a']} vs {r['b']}", r["metric"], str(int(r["n"]))]
        if "p_t" not in r or not np.isfinite(r.get("p_t", np.nan)):
            lines.append("| " + " | ".join(lead + [""] * 6 + [r["reading"]]) + " |")
            continue
        f = f".{digits}f"
        stats = [f"{scale * r['delta']:+{f}} [{scale * r['ci_lo']:+{f}}, {scale * r['ci_hi']:+{f}}]", _p(r["p_t"]),
                 _p(r["p_wilcoxon"]), _p(r["p_sign"]), f"{_p(r['p_adj'])} ({r['method']})", f"{scale * r['mde']:{f}}"]
        lines.append("| " + " | ".join(lead + stats + [r["reading"]]) + " |")
    return "\n".join(lines) + "\n"


def reading(c: Comparison) -> str:
    """One of three sentences: "A better than B (...)", "B better than A (...)" (the mean difference
    A - B, its 95% CI and the adjusted p), or "no detectable difference; the smallest effect this
    design detects is X". Accuracies and F1 in points."""
    scale, digits = display_scale(c.metric)
    unit = " points" if scale == 100 else ""
    f = f".{digits}f"
    if c.better is None:
        return f"no detectable difference; the smallest effect this design detects is {scale * c.mde:{f}}{unit} of {c.metric}"
    first, second = (c.a, c.b) if c.better == c.a else (c.b, c.a)
    adj = "adjusted p" if c.method == "none" else f"{'Holm' if c.method == 'holm' else 'BH'}-adjusted p"
    return (f"{first} better than {second} ({c.metric} {c.a} − {c.b} {scale * c.delta:+{f}}{unit}, 95% CI "
            f"[{scale * c.ci_lo:+{f}}, {scale * c.ci_hi:+{f}}], {adj} {_p(c.p_adj)})")


# ----------------------------------------------------------------------------------------------
# Seeds and test samples: the bootstrap


def metric_function(name: str, task: str = "regression", dataset: str = "auto"):
    """``metric(pred, y) -> float`` for one metric of ``mskt.metrics.compute_metrics`` (e.g. "mae",
    "acc2_nonzero"), for :func:`bootstrap`."""

    def metric(pred, y):
        values = compute_metrics(task, pred, y, dataset)
        if name not in values:
            raise StatsError(f"metric {name!r}: not among {', '.join(values)}")
        return values[name]

    metric.__name__ = name
    return metric


def bootstrap(pred_a, pred_b, y, metric, n_boot: int = 2000, seed: int = 0, alpha: float = ALPHA) -> dict:
    """The difference metric(A) - metric(B) with test-set noise counted once: a bootstrap that resamples
    seeds and, within each resampled seed, test samples, with the same sample indices for A and B.

    ``pred_a``, ``pred_b``: per-sample predictions (or per-sample errors), shape (seeds, samples, ...),
    at the same seeds on the same test samples. ``y``: the labels, (samples, ...) for every seed or
    (seeds, samples, ...); None when ``metric`` takes the per-sample values alone (e.g. ``np.mean`` of
    absolute errors). ``metric``: ``f(pred, y) -> float`` (or ``f(values)`` when ``y`` is None), or a
    metric name of the regression metrics (:func:`metric_function` for other tasks).

    Returns delta (the mean over seeds of metric(A_s) - metric(B_s)), ci_lo and ci_hi (percentile,
    1 - alpha), p (two-sided: twice the smaller share of resampled deltas on either side of 0),
    n_seeds, n_samples, n_boot. With one seed only the test samples are resampled.

    With few seeds this interval is too narrow: resampling 4 seeds with replacement gives their mean
    (n-1)/n of its variance, and a percentile has no t correction. On a 4-seed grid (language_vision
    vs kt, MAE) it gave [-0.249, -0.028] where the paired t gave [-0.292, +0.035]. Decide with
    :func:`compare` (the paired t over seeds); read this for how much the test set adds."""
    if isinstance(metric, str):
        metric = metric_function(metric)
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.shape != b.shape or a.ndim < 2:
        raise StatsError(f"bootstrap: pred_a and pred_b need shape (seeds, samples, ...) and the same shape; got {a.shape} and {b.shape}")
    n_seeds, n_samples = a.shape[:2]
    if n_samples < 2:
        raise StatsError(f"bootstrap: needs at least 2 test samples, got {n_samples}")
    if y is not None:
        y = np.asarray(y)
        per_seed_y = y.ndim == a.ndim and y.shape[0] == n_seeds and y.shape[1] == n_samples
        if not per_seed_y and y.shape[0] != n_samples:
            raise StatsError(f"bootstrap: y has shape {y.shape}; expected ({n_samples}, ...) or ({n_seeds}, {n_samples}, ...)")

    def score(pred, s, idx):
        if y is None:
            return float(metric(pred[idx]))
        ys = y[s] if per_seed_y else y
        return float(metric(pred[idx], ys[idx]))

    everything = np.arange(n_samples)
    delta = float(np.mean([score(a[s], s, everything) - score(b[s], s, everything) for s in range(n_seeds)]))
    if not math.isfinite(delta):
        raise StatsError(f"bootstrap: the metric is not finite on the full test set (delta {delta})")
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for i in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        diffs = []
        for s in seeds:
            idx = rng.integers(0, n_samples, n_samples)  # one draw of test samples, used for A and for B
            diffs.append(score(a[s], s, idx) - score(b[s], s, idx))
        draws[i] = np.mean(diffs)
    bad = ~np.isfinite(draws)
    if bad.any():  # e.g. Corr of a resample with constant predictions
        raise StatsError(f"bootstrap: the metric is not finite on {int(bad.sum())} of {n_boot} resamples; use a metric defined on every resample")
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    below, above = (1 + np.sum(draws <= 0)) / (n_boot + 1), (1 + np.sum(draws >= 0)) / (n_boot + 1)
    return {"delta": delta, "ci_lo": float(lo), "ci_hi": float(hi), "p": float(min(1.0, 2 * min(below, above))),
            "n_seeds": int(n_seeds), "n_samples": int(n_samples), "n_boot": int(n_boot)}
