# covidct: fully automatic chest-CT pipeline for COVID-19 diagnosis and prognosis.
# Thin on purpose: the stages live in workflow/rules/*.smk, each rule calls one `covidct <stage>`.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/prognosis.smk"
include: "workflow/rules/learning_curve.smk"
include: "workflow/rules/flow.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
