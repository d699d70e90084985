"""Gate-aware tuning (tune.gate_aware): the promotion gates as Optuna constraints.

Each trial estimates the gates on its validation rows (evaluation/feasibility.py) at the epochs
where the scheduler may stop it and at its end, and reports `constraint/<rule>` (<= 0: the rule
holds) and `feasible`. Ray Tune's OptunaSearch only tells Optuna the objective, so
`GateAwareOptunaSearch` records a finished trial's constraints with `trial.set_constraint`
first: Optuna's samplers then steer away from infeasible regions. The study's best is its best
feasible trial; when none is feasible the summary says so and names the rule that bound.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from mlops_ray.evaluation.feasibility import PREFIX
from mlops_ray.tune.resumable_search import ResumableOptunaSearch


class GateAwareOptunaSearch(ResumableOptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        ot = self._ot_trials.get(trial_id)
        if ot is not None and result and trial_id not in self._completed_trials:
            for k, v in result.items():
                if k.startswith(PREFIX) and v == v:  # NaN is not a constraint value
                    ot.set_constraint(k[len(PREFIX):], float(v))
        super().on_trial_complete(trial_id, result, error)


def gate_spec(job: Any, prepared: Any) -> dict[str, Any] | None:
    """The loop's `gate` argument (None: not gate-aware): the expanded rules and how the
    evaluation judges, with the evaluation's test size for the CI projection."""
    from mlops_ray.evaluation.gates import expand_rules
    if not job.tune.gate_aware or job.gates is None:
        return None
    attrs = job.fairness.attributes or list(job.dataset.sensitive)
    f = job.fairness
    return {"rules": expand_rules([r.plain() for r in job.gates.rules], attrs),
            "objective": job.threshold.objective, "max_rate_ratio": job.threshold.max_rate_ratio,
            "mitigation": f.mitigation, "constraint": f.constraint,
            "mitigation_attribute": f.mitigation_attribute,
            "min_group_size": max(f.min_group_size, job.tune.gate_min_group_rows),
            "n_boot": job.tune.gate_n_boot or f.n_boot, "seed": job.seed,
            "judged_rows": int(len(prepared.splits["test"]))}


def sensitive_val(job: Any, prepared: Any) -> Any:
    """The validation rows' sensitive columns (what the trials' estimates group by)."""
    attrs = job.fairness.attributes or list(job.dataset.sensitive)
    return prepared.frame.iloc[prepared.splits["val"]][attrs].reset_index(drop=True)


def milestones(job: Any) -> list[int]:
    """epochs_done values where ASHA may stop a trial (its last report is then the one the
    searcher is told), below the last epoch (estimated anyway)."""
    s, out = job.scheduler, list[int]()
    if s.name != "asha":
        return out
    t = s.grace_period
    while t < job.max_t():
        out.append(int(t))
        t = int(round(t * s.reduction_factor))
    return out


def constraints_of(last: dict[str, Any]) -> dict[str, float]:
    return {k[len(PREFIX):]: v for k, v in last.items()
            if k.startswith(PREFIX) and v is not None}


def feasibility(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Per trial: its constraints and whether it is feasible (no estimate: unknown); for the
    study: how many were feasible and, when none, the rule that bound most often."""
    for t in trials:
        cons = constraints_of(t.get("_rows", [{}])[-1] if t.get("_rows") else {})
        t["constraints"] = cons
        t["feasible"] = (all(v <= 0 for v in cons.values()) if cons else None)
        t["binding"] = max(cons, key=lambda k: cons[k]) if cons and not t["feasible"] else None
    known = [t for t in trials if t["feasible"] is not None]
    bound = Counter(t["binding"] for t in known if t["binding"])
    return {"estimated": len(known), "feasible": sum(bool(t["feasible"]) for t in known),
            "binding": bound.most_common(1)[0][0] if bound else None,
            "binding_counts": dict(bound)}


def plot_pareto(trials: list[dict[str, Any]], rules: list[dict[str, Any]], metric: str,
                path: str) -> list[str]:
    """The trials' metric against each estimated fairness rule's compared value (feasible
    trials filled), the rule's threshold and the Pareto front; returns the rules plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fair = [r for r in rules if r["metric"].startswith("fair/")
            and any(r["name"] in t.get("constraints", {}) for t in trials)]
    if not fair:
        return []
    fig, axes = plt.subplots(1, len(fair), figsize=(4.5 * len(fair), 4), squeeze=False)
    for ax, r in zip(axes[0], fair, strict=True):
        sign = 1 if r["op"] in ("<=", "<") else -1  # constraint -> the compared value
        pts = [(t["constraints"][r["name"]] * sign + float(r["threshold"]),
                t["last"].get(metric), bool(t["feasible"])) for t in trials
               if r["name"] in t.get("constraints", {}) and t["last"].get(metric) is not None]
        for ok in (True, False):
            xs = [(x, y) for x, y, f in pts if f is ok]
            if xs:
                ax.scatter(*zip(*xs, strict=True), label="feasible" if ok else "infeasible",
                           facecolors=None if ok else "none", edgecolors="C0" if ok else "C3",
                           color="C0" if ok else None)
        front, best = [], float("-inf")  # lower fairness gap, higher metric
        for x, y, _ in sorted(pts, key=lambda p: (sign * p[0], -p[1])):
            if y > best:
                front.append((x, y))
                best = y
        if front:
            ax.step(*zip(*front, strict=True), where="post", color="grey", label="Pareto front")
        ax.axvline(float(r["threshold"]), color="C3", linestyle="--", label="gate")
        ax.set_xlabel(f"{r['metric']} ({r.get('on') or r.get('compare', 'value')})")
        ax.set_ylabel(metric)
        ax.set_title(r["name"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [r["name"] for r in fair]
