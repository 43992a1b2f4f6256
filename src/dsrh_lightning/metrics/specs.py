"""Per-query retrieval metrics as specs: one entry names a metric, the option that sets its cut-off and how
its per-query value follows from a few quantities that both engines compute.

The engines (:mod:`.engine_numba`, and the torch engine in :mod:`.retrieval`) compute, for each query and
each requested ``(quantity, cut-off)`` pair, one float64 number (``1..nd`` is a rank cut-off ``c``; for the
``ball_*`` quantities the cut-off is a Hamming radius):

=============  ==========================================================================================
``ap``         AP@c: mean of precision@pos over the relevant positions ``pos <= c`` (0 when there is none)
``hits``       relevant items in the top ``c`` (an expectation under ``ties="average"``)
``dcg``        ``sum_{pos <= c} (2^r - 1) / log2(pos + 1)``, ``r`` = shared labels (multilevel relevance)
``ideal_dcg``  the same sum for the whole database ordered by ``r``, descending
``gain_sum``   ``sum_{pos <= c} r``
``wap``        mean of ACG@pos over the relevant positions ``pos <= c`` (0 when none; stable ties only)
``ball_rel``   relevant items within Hamming distance ``c``
``ball_items`` items within Hamming distance ``c``
=============  ==========================================================================================

A metric's ``finish(q, k, n_rel)`` turns them into its per-query values: ``q`` maps each quantity in
``needs`` to a ``(nq,)`` float64 array (numpy or torch, whichever the engine used), ``k`` is the clamped
cut-off and ``n_rel`` ``(nq,)`` the relevant items in the whole database. Write it with arithmetic and
:func:`ratio` only, so it works on both. :func:`~dsrh_lightning.metrics.retrieval_metrics` averages the
values over the queries (empty-query policy included).

Adding a metric that is a function of these quantities: one :class:`MetricSpec` in :data:`METRICS` (a new
option becomes a keyword of ``retrieval_metrics`` and a flag of ``dsrh eval-codes``), one ``EvalConfig`` key of
the same name for the validation callback, and its reference test. A metric that needs a new per-item
quantity also needs that quantity in both engines.

This module imports nothing heavy (the command line reads the option table).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

__all__ = ["QUANTITIES", "MetricSpec", "METRICS", "Plan", "metric_options", "options_from", "plan_metrics", "ratio"]

QUANTITIES = ("ap", "hits", "dcg", "ideal_dcg", "gain_sum", "wap", "ball_rel", "ball_items")
RADIUS_QUANTITIES = ("ball_rel", "ball_items")
MULTILEVEL_QUANTITIES = ("dcg", "ideal_dcg", "gain_sum", "wap")

# How an option's value is read:
#   "topk"    one cut-off, None = the whole database (the metric is always computed)
#   "cutoff"  one cut-off, None = the metric is not computed
#   "cutoffs" a sequence of cut-offs (an int is one); the key holds "{k}", replaced by each value as given
#   "radius"  a Hamming radius >= 0 (the metric is always computed)
OPTION_KINDS = ("topk", "cutoff", "cutoffs", "radius")


def ratio(num, den):
    """``num / den`` per element, 0 where ``den <= 0``; numpy arrays or torch tensors (float64 in, float64 out)."""
    ok = den > 0
    return num / (den + ~ok) * ok


@dataclass(frozen=True)
class MetricSpec:
    """One per-query metric.

    ``key``: the result key (``"{k}"`` in it is replaced by the cut-off for ``"cutoffs"`` options).
    ``option``: the keyword of ``retrieval_metrics`` (and ``EvalConfig`` key) that sets the cut-off; specs
    sharing an option share its value. ``kind`` / ``default``: how the option is read (see ``OPTION_KINDS``).
    ``needs``: quantities at that cut-off. ``finish(q, k, n_rel)``: per-query values ``(nq,)``.
    ``stable_only``: the metric has no closed form under ``ties="average"``.
    """

    key: str
    option: str
    needs: Tuple[str, ...]
    finish: Callable[[Dict[str, Any], int, Any], Any]
    kind: str = "cutoff"
    default: Any = None
    stable_only: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise ValueError(f"metric {self.key!r}: kind must be one of {OPTION_KINDS}, got {self.kind!r}")
        unknown = [q for q in self.needs if q not in QUANTITIES]
        if unknown:
            raise ValueError(f"metric {self.key!r}: unknown quantities {unknown}; the engines compute {QUANTITIES}")
        radius = [q in RADIUS_QUANTITIES for q in self.needs]
        if any(radius) != (self.kind == "radius") or (any(radius) and not all(radius)):
            raise ValueError(f"metric {self.key!r}: the ball_* quantities go with kind='radius', the others with "
                             "rank cut-offs")
        if (self.kind == "cutoffs") != ("{k}" in self.key):
            raise ValueError(f"metric {self.key!r}: a 'cutoffs' option needs '{{k}}' in the key, other kinds none")


METRICS: Tuple[MetricSpec, ...] = (
    MetricSpec("map", "topk", ("ap",), lambda q, k, n_rel: q["ap"], kind="topk",
               help="MAP cut-off K (default or 0: whole database)"),
    MetricSpec("precision_radius", "radius", ("ball_rel", "ball_items"),
               lambda q, k, n_rel: ratio(q["ball_rel"], q["ball_items"]), kind="radius", default=2,
               help="Hamming radius for precision_radius"),
    MetricSpec("precision@{k}", "precision_at", ("hits",), lambda q, k, n_rel: q["hits"] / k, kind="cutoffs",
               default=(), help="cut-offs of precision@k and recall@k"),
    MetricSpec("recall@{k}", "precision_at", ("hits",), lambda q, k, n_rel: ratio(q["hits"], n_rel),
               kind="cutoffs", default=()),
    MetricSpec("ndcg", "ndcg_k", ("dcg", "ideal_dcg"), lambda q, k, n_rel: ratio(q["dcg"], q["ideal_dcg"]),
               help="NDCG cut-off (default or 0: not computed)"),
    MetricSpec("acg", "acg_k", ("gain_sum",), lambda q, k, n_rel: q["gain_sum"] / k,
               help="ACG cut-off (default or 0: not computed)"),
    MetricSpec("wmap", "wmap_topk", ("wap",), lambda q, k, n_rel: q["wap"], stable_only=True,
               help="weighted MAP cut-off (default or 0: not computed)"),
)


def metric_options(specs: Sequence[MetricSpec] = METRICS) -> Dict[str, MetricSpec]:
    """The options of ``specs`` in order of first appearance: name -> the first spec that uses it (its
    ``kind``, ``default`` and ``help`` describe the option). Specs that share an option must agree on it."""
    out: Dict[str, MetricSpec] = {}
    for s in specs:
        first = out.setdefault(s.option, s)
        if (first.kind, first.default) != (s.kind, s.default):
            raise ValueError(f"metrics {first.key!r} and {s.key!r} share option {s.option!r} but read it "
                             f"differently ({first.kind}, {first.default!r}) vs ({s.kind}, {s.default!r})")
    return out


def options_from(get: Callable[[str], Any], specs: Sequence[MetricSpec] = METRICS) -> Dict[str, Any]:
    """The option values a config or the parsed flags set, ready for ``retrieval_metrics``.

    ``get(name)`` returns the value of an option, or None where the source does not set it (the option keeps
    its default). A cut-off of 0 means the whole database (``topk``) or not computed (``cutoff``); lists of
    cut-offs become tuples.
    """
    out: Dict[str, Any] = {}
    for name, spec in metric_options(specs).items():
        value = get(name)
        if value is None:
            continue
        if spec.kind in ("topk", "cutoff"):
            value = None if value == 0 else value
        elif spec.kind == "cutoffs":
            value = tuple(value)
        out[name] = value
    return out


@dataclass(frozen=True)
class Entry:
    """One result key of a plan: the spec, its clamped cut-off and the slot of each quantity it needs."""

    key: str
    spec: MetricSpec
    cut: int
    slots: Dict[str, int]


@dataclass(frozen=True)
class Plan:
    """The checked metric request for a database of ``nd`` items.

    ``slots``: the distinct ``(quantity, cut-off)`` pairs the engine computes, in order. ``entries``: the
    result keys in output order. ``values``: each option's resolved value (cut-offs clamped to ``1..nd``).
    """

    slots: Tuple[Tuple[str, int], ...]
    entries: Tuple[Entry, ...]
    values: Dict[str, Any]
    pr_curve: bool

    @property
    def multilevel(self) -> bool:
        """True when a quantity needs the multilevel relevance ``r`` (shared labels)."""
        return any(q in MULTILEVEL_QUANTITIES for q, _ in self.slots)

    @property
    def k_max(self) -> int:
        """The largest rank cut-off: no item ranked after it counts for any metric."""
        return max([c for q, c in self.slots if q not in RADIUS_QUANTITIES] or [1])

    def wants(self, quantity: str) -> bool:
        """True when ``quantity`` is computed at some cut-off."""
        return any(q == quantity for q, _ in self.slots)


def _check_cutoff(value, name: str, nd: int):
    if value is None:
        return None
    if not _is_integer(value):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (use None for the whole database), got {value}")
    return int(min(int(value), nd))


def _is_integer(value) -> bool:
    """True for Python and numpy integers (numpy registers its integers as ``numbers.Integral``), not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def plan_metrics(nd: int, ties: str, options: Dict[str, Any], pr_curve: bool = False,
                 specs: Sequence[MetricSpec] = METRICS) -> Plan:
    """Check ``options`` (option name -> value; missing ones take their default) against a database of ``nd``
    items and list what the engine must compute. Unknown option names raise ``TypeError``."""
    table = metric_options(specs)
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise TypeError(f"retrieval_metrics() got unexpected keyword argument(s) {unknown}; "
                        f"metric options are {list(table)}")
    values: Dict[str, Any] = {}
    asked: Dict[str, List[Tuple[Any, int]]] = {}  # option -> [(value as given, clamped cut-off)]
    for name, spec in table.items():
        value = options.get(name, spec.default)
        if spec.kind == "radius":
            if not _is_integer(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
            values[name] = int(value)
            asked[name] = [(int(value), int(value))]
        elif spec.kind == "cutoffs":
            if _is_integer(value):
                value = (value,)
            pairs = [(int(v), _check_cutoff(v, name, nd)) for v in value]
            values[name] = [c for _, c in pairs]
            asked[name] = pairs
        else:
            if spec.kind == "topk" and value is None:
                cut = nd
            else:
                cut = _check_cutoff(value, name, nd)
            values[name] = cut
            asked[name] = [] if cut is None else [(cut, cut)]
    slots: List[Tuple[str, int]] = []
    entries: List[Entry] = []
    for name in table:
        users = [s for s in specs if s.option == name]
        for given, cut in asked[name]:
            for spec in users:
                if spec.stable_only and ties == "average":
                    raise ValueError(f"{name} is only supported with ties='stable'")
                idx = {}
                for q in spec.needs:
                    if (q, cut) not in slots:
                        slots.append((q, cut))
                    idx[q] = slots.index((q, cut))
                key = spec.key.replace("{k}", str(given))
                entries.append(Entry(key=key, spec=spec, cut=cut, slots=idx))
    return Plan(slots=tuple(slots), entries=tuple(entries), values=values, pr_curve=bool(pr_curve))
