"""The inference and evaluation CLIs as a new user meets them (issue 15, items 10, 11, 12): run
directories as --bundle, output names, contradictory keys, small or odd-shaped images, training-format
pose files, bundle config typos, CPU threads, and evaluation on a bundle's own training data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from infer.__main__ import image_note, main
from infer.config import default_threads
from models.bundle import META, save_bundle

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run's directory layout holding a tiny random bundle at export/bundle, and an 8x8 image."""
    from test_infer import make_bundle

    root = tmp_path_factory.mktemp("run")
    make_bundle(root / "export" / "bundle")
    cv2.imwrite(str(root / "tiny.png"), np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    return root


def _cli(run_dir: Path, *args: str, image: str = "tiny.png") -> int:
    return main(["--bundle", str(run_dir), "--image", str(run_dir / image), *args])


def test_run_directory_bundle_output_name_image_note_and_threads(run_dir, tmp_path, capsys):
    # --bundle RUN_DIR means RUN_DIR/export/bundle; --out without a suffix gets .mp4; an 8x8 image is upscaled with a note
    assert _cli(run_dir, "--pose", "w-3", "--out", str(tmp_path / "walk"), "--threads", "1") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"using the bundle {run_dir / 'export' / 'bundle'}" in out
    assert "note: image 8x8 is centre-cropped to 8x5 (keeping 62% of it) for the bundle's 24x16 aspect and upscaled 3.2x" in out
    assert "CPU threads: 1 of" in out
    assert (tmp_path / "walk.mp4").is_file() and not (tmp_path / "walk").exists()
    assert json.loads((tmp_path / "walk.json").read_text())["settings"]["threads"] == 1
    assert image_note((400, 20), (16, 24)).startswith("image 20x400 is centre-cropped to 20x13 (keeping 3% of it)")
    assert image_note((32, 48), (16, 24)) is None  # same aspect, shrunk: nothing to say
    assert _cli(run_dir, "--pose", "w-3", "--out", str(tmp_path / "walk.avi")) == 2
    assert "ending in .mp4" in capsys.readouterr().err
    # the --help example is the path `make demo` writes
    import infer.__main__ as cli

    assert "--bundle outputs/demo/midtrain/export/bundle --image outputs/demo/first_frame.png" in cli.__doc__


def test_contradictory_keys_training_pose_files_and_bundle_typos_are_named(run_dir, tmp_path, capsys):
    assert _cli(run_dir, "--pose", "w+s-7", "--out", str(tmp_path / "a.mp4")) == 2  # today: standing still, silently
    assert "'w' and 's' together, which cancel" in capsys.readouterr().err
    poses = tmp_path / "train_poses.json"
    poses.write_text(json.dumps([{"w2c": np.eye(4).tolist(), "intrinsic": [[50, 0, 12], [0, 50, 8], [0, 0, 1]]}] * 4))
    assert _cli(run_dir, "--pose", str(poses), "--out", str(tmp_path / "b.mp4")) == 2
    err = capsys.readouterr().err
    assert err.count(str(poses)) == 1 and "'extrinsic'" in err and "['intrinsic', 'w2c']" in err, err
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "export" / "bundle", broken)
    text = (broken / "config.yaml").read_text()
    (broken / "config.yaml").write_text(text.replace("  hidden:", "  hiden:", 1))
    assert main(["--bundle", str(broken), "--image", str(run_dir / "tiny.png"), "--pose", "w-3", "--out", str(tmp_path / "c.mp4")]) == 2
    err = capsys.readouterr().err
    assert f"bundle {broken}" in err and "hiden" in err, err
    assert not list(tmp_path.glob("*.mp4"))


def test_default_threads_leave_busy_cpus_alone(monkeypatch):
    import os

    import infer.config as config

    monkeypatch.setattr(config, "available_cpus", lambda: 8)
    for load, threads in ((6.3, 2), (11.0, 1), (0.2, 8)):  # 8 CPUs, of which int(load) are busy
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert default_threads() == threads, load


def test_eval_warns_when_the_data_is_the_bundles_training_data(run_dir, tmp_path):
    from eval.__main__ import warn_if_training_data

    bundle = tmp_path / "bundle"
    shutil.copytree(run_dir / "export" / "bundle", bundle)
    meta = json.loads((bundle / META).read_text())
    meta["data"] = {"path": str((tmp_path / "train_data").resolve()), "num_latents": 8}
    (bundle / META).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="is the dataset bundle 'mine' was trained on"):
        assert warn_if_training_data(bundle, tmp_path / "train_data", "mine")
    assert not warn_if_training_data(bundle, tmp_path / "heldout", "mine")
