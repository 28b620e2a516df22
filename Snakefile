# covidct: `snakemake --cores all` from this folder runs the workflow in workflow/Snakefile (the
# layout the Snakemake workflow catalog and snakedeploy expect). Included as a module includes
# it, so that its `rule all` stays the default target.
workflow.include("workflow/Snakefile", overwrite_default_target=True)
