"""Fetch the six COVID-CT-MD sample cases the tests use, and derive their test copies.

    python tests/data/fetch_covid_ct_md.py [--out tests/data/real/covid_ct_md]

COVID-CT-MD (Afshar et al., Sci Data 8:121, 2021) publishes two patients per class (COVID-19,
community-acquired pneumonia, normal) as DICOM series in its GitHub repository, which carries no
licence; this project therefore does not redistribute them. The command clones only the
repository's "Sample data" folder (git, about 230 MB) and writes each series, read in GDCM's
series order and binned 4 x 4 in-plane, as ``{case}_ct_bin4x4x1.nii.gz`` (int16 HU).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPOSITORY = "https://github.com/ShahinSHH/COVID-CT-MD.git"
CASES = {
    "P001": "COVID-19 subjects/P001", "P002": "COVID-19 subjects/P002",
    "cap001": "Cap subjects/cap001", "cap002": "Cap subjects/cap002",
    "normal001": "Normal subjects/normal001", "normal002": "Normal subjects/normal002",
}
DEFAULT_OUT = Path(__file__).resolve().parent / "real" / "covid_ct_md"


def derive(series_folder: Path, out: Path) -> Path:
    """One DICOM series binned 4 x 4 x 1 into an int16 NIfTI file (the tests' copy)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_folder)))
    image = sitk.Cast(sitk.BinShrink(reader.Execute(), [4, 4, 1]), sitk.sitkInt16)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(out), True)
    return out


def fetch(out: Path) -> list[Path]:
    """Clone the sample data (sparse, shallow) and derive every case into ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "covid-ct-md"
        subprocess.run(["git", "clone", "--depth", "1", "--filter=blob:none", "--sparse",
                        REPOSITORY, str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "sparse-checkout", "set", "Sample data"],
                       check=True)
        return [derive(clone / "Sample data" / folder, out / f"{case}_ct_bin4x4x1.nii.gz")
                for case, folder in CASES.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the derived cases (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for path in fetch(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
