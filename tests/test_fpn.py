"""The DenseNet121-FPN lung segmenter: network, pre/post-processing, a tiny training run
through the command line (real NIfTI files, real MLflow SQLite store) and inference with the
model it wrote.

Full-size training on the synthetic cohort and the COPDGene Dice are in benchmarks/bench_fpn.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from covidct.cli import main
from covidct.errors import CovidctError
from covidct.io.results import read_run
from covidct.io.tracking import client as tracking_client
from covidct.model import fpn as network
from covidct.model import segmenter
from covidct.preprocess import lung_fpn
from covidct.preprocess.morphology import dice

SIZE = 64


def phantom(seed: int, shape=(12, 72, 80), spacing=(5.0, 4.0, 4.0)):
    """A small chest phantom: air around a soft-tissue body with a spine, two ellipsoid lungs
    (-850 HU with bright vessels) and a trachea above them (air, not lung). (ct int16, mask)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    cy, cx = ny / 2 + rng.uniform(-2, 2), nx / 2 + rng.uniform(-2, 2)
    body = ((y - cy) / (0.40 * ny)) ** 2 + ((x - cx) / (0.46 * nx)) ** 2 <= 1
    ct = np.where(body, 40.0, -1000.0)
    ct[((y - (cy + 0.28 * ny)) ** 2 + (x - cx) ** 2) <= (0.06 * nx) ** 2] = 500.0   # spine
    z_top = nz - 2 - int(rng.integers(0, 2))
    zc, rz = z_top / 2 + 0.5, z_top / 2
    lung = np.zeros(shape, bool)
    for side in (-1, 1):
        ly = (y - (cy - 0.02 * ny)) / (0.26 * ny * rng.uniform(0.9, 1.1))
        lx = (x - (cx + side * 0.22 * nx)) / (0.15 * nx * rng.uniform(0.9, 1.1))
        lung |= ly ** 2 + lx ** 2 + ((z - zc) / rz) ** 2 <= 1
    ct[lung] = -850.0
    vessels = lung & (rng.random(shape) < 0.02)
    ct[vessels] = 0.0
    trachea = (z >= z_top - 1) & (((y - cy + 0.1 * ny) ** 2 + (x - cx) ** 2) <= (0.05 * nx) ** 2)
    ct[trachea & ~lung] = -1000.0
    ct += rng.normal(0, 20, shape)
    return np.clip(np.rint(ct), -1024, 3000).astype(np.int16), lung.astype(np.uint8), spacing


def write_nifti(array, spacing_zyx, path):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path))
    return path


# ---------------------------------------------------------------------------- pure functions
def test_resize_is_linear_antialiased_and_keeps_constants():
    for n_in, n_out in ((64, 128), (512, 128), (80, 64), (7, 7)):
        m = lung_fpn._resize_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-5)
    # shrinking 4x averages blocks of about 4 (antialiasing): a 0/1 stripe pattern becomes ~0.5
    stripes = np.tile(np.array([0.0, 1.0], np.float32), 64)[None, None, :].repeat(8, axis=1)
    small = lung_fpn.resize_slices(stripes, (8, 32))
    assert small.shape == (1, 8, 32)
    np.testing.assert_allclose(small[0, :, 2:-2], 0.5, atol=0.02)
    # enlarging a ramp keeps it a ramp (linear), with half-pixel centres
    ramp = np.arange(4, dtype=np.float32)[None, None, :].repeat(2, axis=1)
    big = lung_fpn.resize_slices(ramp, (2, 8))[0, 0]
    np.testing.assert_allclose(big, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-5)


def test_normalize_floors_hu_and_zscores_each_slice():
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 300, (3, 40, 40)).astype(np.int16)
    ct[1] = -3024                                   # padding below the -1024 floor
    ct[1, :20] = 0
    assert lung_fpn.normalize_slices(ct, 32).shape == (3, 32, 32)
    norm = lung_fpn.normalize_slices(ct, 40)           # same size: no resampling of the noise
    assert norm.dtype == np.float32
    np.testing.assert_allclose(norm[[0, 2]].mean(axis=(1, 2)), 0, atol=0.05)
    np.testing.assert_allclose(norm[[0, 2]].std(axis=(1, 2)), 1, atol=0.05)
    # slice 1 floored at -1024: exactly two values, -1 and +1 after the z-score
    assert norm[1, 2, 5] == pytest.approx(1.0, abs=1e-4)
    assert norm[1, -3, 5] == pytest.approx(-1.0, abs=1e-4)


def test_field_of_view_crops_pads_about_the_centre_and_maps_back():
    rng = np.random.default_rng(1)
    stack = rng.normal(0, 1, (2, 64, 64)).astype(np.float32)
    # 64 px of 4.17 mm (267 mm) in a 360 mm field: 86 px, padded by 11 each side (centred)
    win = lung_fpn.fov_window((64, 64), (4.17, 4.17), 360.0)
    assert win == ((86, -11), (86, -11))
    field = lung_fpn.to_fov(stack, win, -5.0)
    assert field.shape == (2, 86, 86)
    np.testing.assert_array_equal(field[:, 11:75, 11:75], stack)
    assert (field[:, :11] == -5.0).all() and (field[:, :, 75:] == -5.0).all()
    np.testing.assert_array_equal(lung_fpn.from_fov(field, win, (64, 64)), stack)
    # 400 px of 1 mm in a 360 mm field: cropped to the central 360; mapped back with 0 outside
    big = rng.normal(0, 1, (1, 400, 380)).astype(np.float32)
    win = lung_fpn.fov_window((400, 380), (1.0, 1.0), 360.0)
    assert win == ((360, 20), (360, 10))
    back = lung_fpn.from_fov(lung_fpn.to_fov(big, win, 0.0), win, (400, 380))
    np.testing.assert_array_equal(back[:, 20:380, 10:370], big[:, 20:380, 10:370])
    assert back[:, :20].sum() == 0 and back[:, :, 370:].sum() == 0
    assert lung_fpn.fov_window((64, 64), (4.0, 4.0), 0) is None
    assert lung_fpn.fov_window((64, 64), None, 360.0) is None


def test_field_of_view_gives_the_network_a_fixed_scale():
    """The same body (a 280 x 200 mm ellipse of soft tissue with a 60 mm air disc) on a coarse
    full-field grid and a fine larger-field grid: after the fixed-field normalisation the two
    network inputs nearly agree; resized whole slices (no field) do not."""
    def slice_of(n, spacing):
        c = (np.arange(n) - (n - 1) / 2) * spacing
        y, x = np.meshgrid(c, c, indexing="ij")
        ct = np.where((y / 100.0) ** 2 + (x / 140.0) ** 2 <= 1, 40.0, -1000.0)
        ct[(y ** 2 + (x - 60.0) ** 2) <= 30.0 ** 2] = -850.0
        return ct[None].astype(np.int16)

    a, sa = slice_of(72, 4.0), (4.0, 4.0)           # 288 mm: the body nearly fills the view
    b, sb = slice_of(160, 2.5), (2.5, 2.5)          # 400 mm
    na = lung_fpn.normalize_slices(a, 64, sa, 360.0)
    nb = lung_fpn.normalize_slices(b, 64, sb, 360.0)
    assert np.abs(na - nb).mean() < 0.1
    whole = np.abs(lung_fpn.normalize_slices(a, 64) - lung_fpn.normalize_slices(b, 64)).mean()
    assert whole > 3 * np.abs(na - nb).mean()


def test_neighbour_channels_repeat_edge_slices():
    idx = lung_fpn.neighbour_index(5, [0, 2, 4])
    np.testing.assert_array_equal(idx, [[0, 0, 1], [1, 2, 3], [3, 4, 4]])
    vol = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 4, 4), np.float32)
    x = lung_fpn.stack_channels(vol, [0, 4])
    assert x.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(x[0, 0, 0], [0, 0, 1])
    np.testing.assert_array_equal(x[1, 0, 0], [3, 4, 4])


def test_postprocess_keeps_two_lungs_drops_specks_fills_holes():
    m = np.zeros((6, 30, 30), np.uint8)
    m[1:5, 5:25, 3:12] = 1            # right lung, 720 voxels
    m[1:5, 5:25, 16:27] = 1           # left lung, 880
    m[2, 10, 7] = 0                   # a vessel hole inside the lung
    m[0, 0, 0] = 1                    # a speck (1 voxel, third component)
    m[5, 28:30, 28:30] = 1            # another small component
    out = lung_fpn.postprocess_mask(m)
    assert out.dtype == np.uint8
    assert out[2, 10, 7] == 1 and out[0, 0, 0] == 0 and out[5, 29, 29] == 0
    assert int(out.sum()) == 720 + 880
    # a second component under 5% of the largest is not a lung
    m2 = np.zeros((6, 30, 30), np.uint8)
    m2[0:6, 0:20, 0:20] = 1
    m2[0:2, 25:28, 25:28] = 1        # 18 voxels < 5% of 2400
    assert int(lung_fpn.postprocess_mask(m2).sum()) == 2400


def test_split_is_patient_level_and_seeded():
    tr, va = segmenter.split_patients(10, 0.2, seed=3)
    assert len(va) == 2 and len(tr) == 8 and not set(tr) & set(va)
    tr2, va2 = segmenter.split_patients(10, 0.2, seed=3)
    np.testing.assert_array_equal(va, va2)
    assert len(segmenter.split_patients(1, 0.2, 0)[1]) == 0       # one patient: no validation
    assert len(segmenter.split_patients(3, 0.2, 0)[1]) == 1


# ---------------------------------------------------------------------------- network
def test_fpn_has_densenet121_encoder_and_sigmoid_output():
    model = network.build_fpn(128)
    assert tuple(model.inputs[0].shape) == (None, 128, 128, 3)
    assert tuple(model.outputs[0].shape) == (None, 128, 128, 1)
    out_layer = model.get_layer(network.OUTPUT_NAME)
    assert out_layer.get_config()["activation"] == "sigmoid"
    encoder = model.get_layer("densenet121")
    names = {layer.name for layer in encoder.layers}
    # DenseNet121 = dense blocks of 6, 12, 24 and 16 conv blocks
    for block, n in ((2, 6), (3, 12), (4, 24), (5, 16)):
        assert f"conv{block}_block{n}_concat" in names
        assert f"conv{block}_block{n + 1}_concat" not in names
    assert [tuple(o.shape[1:3]) for o in encoder.outputs] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    # DenseNet121 without its top holds 7,037,504 parameters
    assert encoder.count_params() == 7_037_504
    assert model.count_params() > encoder.count_params()

    big = network.build_fpn(256)                      # built, never run
    assert tuple(big.outputs[0].shape) == (None, 256, 256, 1)


def test_build_rejects_sizes_and_missing_weights(tmp_path):
    with pytest.raises(CovidctError, match="multiple of 32"):
        network.build_fpn(100)
    with pytest.raises(CovidctError, match="never downloaded") as err:
        network.build_fpn(64, encoder_weights=tmp_path / "imagenet.h5")
    assert "imagenet.h5" in str(err.value)


@pytest.mark.slow
def test_mask_on_another_grid_names_patient_and_file(tmp_path, capsys):
    ct, mask, spacing = phantom(0)
    img = write_nifti(ct, spacing, tmp_path / "P001.nii.gz")
    bad = write_nifti(mask[:, :-4], spacing, tmp_path / "P001_lung.nii.gz")
    rc = main(["train-segmenter", "--images", str(img), "--masks", str(bad),
               "--out", str(tmp_path / "m"), "--tracking-uri", f"sqlite:///{tmp_path}/ml.db"])
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "patient P001" in line and "P001_lung.nii.gz" in line and "differs" in line
    assert not (tmp_path / "m" / "run.json").exists()


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Eight eager training steps (4 epochs of 2 batches of 6 slices) at 64x64 on three
    phantoms (two to train, one to validate), through the command line."""
    tmp = tmp_path_factory.mktemp("fpn")
    images, masks = [], []
    for i in range(3):
        ct, mask, spacing = phantom(i)
        images.append(str(write_nifti(ct, spacing, tmp / f"P{i:03d}.nii.gz")))
        masks.append(str(write_nifti(mask, spacing, tmp / f"P{i:03d}_lung.nii.gz")))
    uri = f"sqlite:///{tmp}/mlflow.db"
    rc = main(["train-segmenter", "--images", *images, "--masks", *masks,
               "--out", str(tmp / "model"), "--size", str(SIZE), "--epochs", "4",
               "--batch-size", "6", "--slices-per-scan", "6", "--val-fraction", "0.34",
               "--lr", "0.003", "--bn-momentum", "0.5", "--no-augment", "--eager",
               "--pyramid-filters", "64", "--segmentation-filters", "32", "--fov-mm", "360",
               "--tracking-uri", uri, "--experiment", "fpn-test", "--threads", "1"])
    assert rc == 0
    return tmp, uri


@pytest.mark.slow
def test_training_reduces_loss_and_records_the_run(trained):
    tmp, uri = trained
    out = tmp / "model"
    assert (out / "model.keras").is_file()
    record = read_run(out)
    assert record["input_shape"] == [SIZE, SIZE]
    assert record["fov_mm"] == 360.0                 # --fov-mm, recorded in the model's name
    assert lung_fpn.model_fov(lung_fpn.load_model(out / "model.keras")) == 360.0
    assert record["n_train"] == 2 and record["n_val"] == 1
    history = pd.read_csv(out / record["history"]).to_dict("records")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= record["val_dice"] <= 1.0
    assert record["val_dice"] == max(h["val_dice"] for h in history)

    client = tracking_client(uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["size"] == str(SIZE) and run.data.params["encoder"] == "DenseNet121"
    assert run.data.metrics["selected_val_dice"] == pytest.approx(record["val_dice"])
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert losses == pytest.approx([h["loss"] for h in history])
    assert record["registered_model"] == "covidct-lung_fpn" and record["version"] == 1
    model = client.get_model_version("covidct-lung_fpn", "1")
    assert model.run_id == run.info.run_id and record["model_uri"].startswith("models:/")


@pytest.mark.slow
def test_predict_mask_of_trained_model_beats_chance(trained):
    tmp, _ = trained
    ct, lung, spacing = phantom(7, shape=(10, 76, 84))      # unseen phantom, other grid
    mask = lung_fpn.predict_mask(ct, spacing, tmp / "model" / "model.keras", batch_size=10)
    assert mask.shape == ct.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    p = lung.mean()
    chance = 2 * p / (1 + p)              # Dice of calling every voxel lung
    d = dice(mask, lung)
    assert d > max(0.5, 2 * chance), (d, chance)
