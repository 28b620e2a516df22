# The synthetic demo cohort: one job per patient writes its scan (DICOM or NIfTI) and exact lung mask.
# Each job's parameters are that patient's row of the cohort, so adding a site regenerates nothing else.
import json
import shlex


def synth_spec(wildcards):
    row = samples.loc[wildcards.patient]
    return shlex.quote(json.dumps({k: (None if pd.isna(v) else v) for k, v in row.items()},
                                  default=str, sort_keys=True))


if SYNTHETIC:

    def _format_sites(fmt):
        sites = {r.site for r in samples.itertuples() if str(r.image).endswith("/dicom") == (fmt == "dicom")}
        return "|".join(sorted(sites)) or "__none__"

    rule synth_dicom:
        wildcard_constraints:
            site=_format_sites("dicom"),
        output:
            image=directory(f"{RESULTS}/synth/{{site}}/{{patient}}/dicom"),
            mask=f"{RESULTS}/synth/{{site}}/{{patient}}/lung_mask.nii.gz",
        params:
            spec=synth_spec,
        conda:
            "../../envs/preprocess.yaml"
        log:
            "logs/synth/{site}/{patient}.log",
        shell:
            "covidct synth --spec {params.spec} --image {output.image} --mask {output.mask} > {log} 2>&1"

    rule synth_nifti:
        wildcard_constraints:
            site=_format_sites("nifti"),
        output:
            image=f"{RESULTS}/synth/{{site}}/{{patient}}/ct.nii.gz",
            mask=f"{RESULTS}/synth/{{site}}/{{patient}}/lung_mask.nii.gz",
        params:
            spec=synth_spec,
        conda:
            "../../envs/preprocess.yaml"
        log:
            "logs/synth/{site}/{patient}.log",
        shell:
            "covidct synth --spec {params.spec} --image {output.image} --mask {output.mask} > {log} 2>&1"


localrules:
    site_sheet,


rule site_sheet:
    """One sheet per site, rewritten only when that site's rows change."""
    output:
        f"{RESULTS}/sheets/{{site}}.tsv",
    params:
        digest=site_rows_digest,
    log:
        "logs/site_sheet/{site}.log",
    run:
        from covidct.zarrio import atomic_path

        rows = samples[samples["site"] == wildcards.site]
        with atomic_path(output[0]) as tmp:
            rows.drop(columns=["y"]).to_csv(tmp, sep="\t", index=False)
        Path(log[0]).write_text(f"{len(rows)} patients of site {wildcards.site}\n")
