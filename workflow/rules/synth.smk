# The synthetic demo cohort: one job per patient writes its scan (DICOM or NIfTI) and exact lung mask.
# Each job's parameters are that patient's row of the cohort, so adding a site regenerates nothing else.
# Their own group `synth` (not `preprocess`): with segmentation.method fpn, train_lung_segmenter
# learns from synthetic scans and every segment job needs it, so one group would hold a cycle.


if SYNTHETIC:

    rule synth_dicom:
        output:
            image=directory(f"{RESULTS}/synth/{{site}}/{{patient}}/dicom"),
            mask=f"{RESULTS}/synth/{{site}}/{{patient}}/lung_mask.nii.gz",
        log:
            "logs/synth/{site}/{patient}.log",
        benchmark:
            "logs/benchmark/synth/{site}/{patient}.tsv"
        wildcard_constraints:
            site=synth_sites("dicom"),
        group:
            "synth"
        conda:
            "../../envs/preprocess.yaml"
        params:
            spec=synth_spec,
        shell:
            "$COVIDCT synth --spec {params.spec} --image {output.image} --mask {output.mask} > {log} 2>&1"

    rule synth_nifti:
        output:
            image=f"{RESULTS}/synth/{{site}}/{{patient}}/ct.nii.gz",
            mask=f"{RESULTS}/synth/{{site}}/{{patient}}/lung_mask.nii.gz",
        log:
            "logs/synth/{site}/{patient}.log",
        benchmark:
            "logs/benchmark/synth/{site}/{patient}.tsv"
        wildcard_constraints:
            site=synth_sites("nifti"),
        group:
            "synth"
        conda:
            "../../envs/preprocess.yaml"
        params:
            spec=synth_spec,
        shell:
            "$COVIDCT synth --spec {params.spec} --image {output.image} --mask {output.mask} > {log} 2>&1"


if LESION_CASES:

    rule synth_lesion_case:
        """A patient with a dense lesion case and its exact lesion-inclusive lung mask: the lung
        FPN's extra training pairs (segmentation.train.lesion_cases)."""
        output:
            image=f"{LESION_CASE_DIR}/{{patient}}/ct.nii.gz",
            mask=f"{LESION_CASE_DIR}/{{patient}}/lung_mask.nii.gz",
            lesion=f"{LESION_CASE_DIR}/{{patient}}/lesion_mask.nii.gz",
        log:
            "logs/synth/lesion_cases/{patient}.log",
        benchmark:
            "logs/benchmark/synth/lesion_cases/{patient}.tsv"
        wildcard_constraints:
            patient="lesion-[0-9]+",
        group:
            "synth"
        conda:
            "../../envs/preprocess.yaml"
        params:
            spec=lesion_case_spec,
        shell:
            (
                "$COVIDCT synth --spec {params.spec} --image {output.image} --mask {output.mask}"
                " --lesion-mask {output.lesion} > {log} 2>&1"
            )


localrules:
    site_sheet,


rule site_sheet:
    """One sheet per site, rewritten only when that site's rows change."""
    output:
        f"{RESULTS}/sheets/{{site}}.tsv",
    log:
        "logs/site_sheet/{site}.log",
    params:
        digest=site_rows_digest,
    run:
        n = write_site_sheet(wildcards.site, output[0])
        Path(log[0]).write_text(
            f"{n} patients of site {wildcards.site} (rows {params.digest})\n"
        )
