"""covidct: fully automatic chest-CT pipeline for COVID-19 diagnosis and prognosis.

After Wang et al. 2020, European Respiratory Journal. Each stage of the Snakemake workflow is one
``covidct <stage>`` subcommand (see :mod:`covidct.cli`), so every stage also runs without Snakemake.
"""

__version__ = "0.1.0"
