"""What the workflow runs for a mix of site roles, and what it does not, with the reason.

Sites have roles (pretrain, train, diagnosis, prognosis); a cohort may lack any of them. The
workflow asks :func:`plan_workflow` once, prints its messages and builds its targets from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkflowPlan:
    """The stages the workflow runs (see :func:`plan_workflow`)."""

    pretrain: bool = False             # pretrain_egfr
    finetune: bool = False             # finetune_covid trains
    init: str | None = None            # what finetune_covid starts from (None: random init)
    ablation: bool = False             # train_random_init and Table S2
    system: str | None = None          # the trained system applied when nothing is trained
    evaluate: list[str] = field(default_factory=list)     # the sites of Table 2
    cox_fit: bool = False              # a Cox model is fitted on the training sites
    cox_apply: bool = False            # the system's Cox model scores the prognosis sites
    cox_sites: list[str] = field(default_factory=list)    # sites with Kaplan-Meier curves
    messages: list[str] = field(default_factory=list)

    @property
    def model(self) -> bool:
        """A COVID-19 model exists: trained here or given as a system."""
        return self.finetune or self.system is not None


def _sites(names) -> str:
    return ", ".join(names) if names else "none"


def plan_workflow(*, pretrain_sites, train_sites, diagnosis_sites, prognosis_sites,
                  init: str | None = None, system: str | None = None,
                  system_has_cox: bool = False, train_events: int = 0,
                  min_events: int = 10) -> WorkflowPlan:
    """The workflow's stages for these sites. ``init`` is ``training.init`` (a model to fine-tune
    from when there is no pretrain site), ``system`` the trained system of the config,
    ``train_events`` the discharges among the training sites' COVID-19 patients with follow-up.
    Raises ValueError for a config that both trains and names a system."""
    if train_sites and system:
        raise ValueError("the config has train sites and a trained system (system:): either "
                         "train a model on the train sites or apply the system, not both")
    p = WorkflowPlan()
    say = p.messages.append
    if pretrain_sites:
        p.pretrain = True
        say(f"pretrain_egfr: EGFR pretraining on {_sites(pretrain_sites)}; the model is "
            "registered as covidct-pretrain_egfr")
    if train_sites:
        p.finetune = True
        if pretrain_sites:
            p.init = "pretrain_egfr"
        elif init:
            p.init = init
            say(f"no pretrain site: finetune_covid starts from training.init ({init})")
        else:
            say("no pretrain site: finetune_covid starts from random init; Table S2 "
                "(pretraining ablation) is not produced")
        p.ablation = p.init is not None
        say(f"finetune_covid: COVID-19 training on {_sites(train_sites)}"
            + (f", from {p.init}" if p.init else ", from random init")
            + ("; train_random_init trains the same without it (Table S2)" if p.ablation else ""))
    elif system:
        p.system = system
        say(f"no train site: nothing is trained; the sites are evaluated with the trained "
            f"system {system}")
    elif pretrain_sites:
        say("a pretrain site alone: nothing is fine-tuned or evaluated (add a train site, or "
            "apply a trained system with system:)")
    else:
        say("no train site and no trained system (system:): nothing is trained or evaluated")
    if not p.model:
        return p

    p.evaluate = list(dict.fromkeys([*train_sites, *diagnosis_sites, *prognosis_sites]))
    say(f"evaluation (Table 2): {_sites(p.evaluate)}")
    if not diagnosis_sites:
        say("no diagnosis site: the classifier is not validated at another hospital")
    if p.finetune:
        if train_events >= max(min_events, 2):
            p.cox_fit = True
            p.cox_sites = sorted({*train_sites, *prognosis_sites})
            say(f"prognosis: the Cox model is fitted on {_sites(train_sites)} ({train_events} "
                f"discharges); Kaplan-Meier and log-rank on {_sites(p.cox_sites)}")
        else:
            say(f"prognosis: no Cox model: the training sites have {train_events} discharged "
                f"COVID-19 patients with follow-up (prognosis.min_events is {min_events}); no "
                "Kaplan-Meier curves, no Table S3")
    elif prognosis_sites and system_has_cox:
        p.cox_apply = True
        p.cox_sites = list(prognosis_sites)
        say(f"prognosis: the system's Cox model and cut-off score {_sites(prognosis_sites)}")
    elif prognosis_sites:
        say("prognosis: the trained system has no Cox model (cox.json): the prognosis sites "
            "are evaluated for diagnosis only")
    if p.model and not prognosis_sites and p.cox_fit:
        say("no prognosis site: the Cox model is checked on the training sites only")
    say(f"explain: saliency, filter patterns and the feature PCA on {_sites(p.evaluate)}")
    return p
