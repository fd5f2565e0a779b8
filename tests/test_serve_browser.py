"""The play page in a real headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it): open the
page, start from a dataset frame, hold W then the right arrow for a few chunks each, download the
session through the browser, and check that the frames arrived, that the recorded path moved the way
the keys say, and that the downloaded pose JSON replays through ``python -m infer`` to the same
action ids. Skips (saying how to enable it) where chromium is not installed."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch

from chromium import Chromium, chromium_path
from conftest import write_render_dataset
from data.actions import KEY_NAMES
from infer.__main__ import main as infer_main
from infer.config import PlayerConfig
from infer.serve import ServeConfig, Server, run_in_thread
from test_infer import make_bundle

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed: `apt-get install chromium` "
                                                       "(as .ci/run does) to run the browser tests of the play page"),
]

W_ID, RIGHT_ID = 9, 1  # action ids of W alone and of yaw-right alone (9 * translation class + rotation class)


def chunks_with(keys: list[str]) -> str:
    """JS: how many chunk headers the page received that were generated with exactly ``keys`` held."""
    return f"window.__chunks.filter(h => JSON.stringify(h.keys) === {json.dumps(json.dumps(keys))}).length"


def test_play_in_chromium_keys_move_the_path_and_download_replays(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    data = write_render_dataset(tmp_path / "data", ["w-12", "right-12"], size=32)
    app = Server(ServeConfig(bundle=str(bundle), out=str(tmp_path / "out"), data=str(data)), PlayerConfig(fps=48.0))
    uv, thread, url = run_in_thread(app)
    try:
        with Chromium(tmp_path / "browser") as br:
            br.open(url + "/")
            br.wait_for("window.worldsmith.state.info && document.querySelectorAll('.thumb').length === 2")
            # Record every chunk header the page gets (the page's own handler runs too).
            br.evaluate("window.__chunks = []; window.worldsmith.state.ws.addEventListener('message', e => {"
                        " if (typeof e.data === 'string') { const m = JSON.parse(e.data); if (m.type === 'chunk') window.__chunks.push(m); } }); 1")
            br.click(".thumb[data-index='0']")
            br.wait_for("window.worldsmith.stats.started === 1")
            br.key("KeyW", down=True)
            br.wait_for(chunks_with(["w"]) + " >= 2")
            br.key("KeyW", down=False)
            br.key("ArrowRight", down=True)
            br.wait_for(chunks_with(["right"]) + " >= 2")
            br.key("ArrowRight", down=False)
            br.wait_for("window.__chunks.at(-1).keys.length === 0")  # a chunk after the release
            br.evaluate("window.worldsmith.send({type: 'pause'}); 1")
            br.wait_for("window.worldsmith.stats.keyLatencies.length >= 2")  # both presses answered on screen
            page = br.evaluate("({shown: window.worldsmith.stats.framesShown, received: window.worldsmith.stats.framesReceived,"
                               " keyLat: window.worldsmith.stats.keyLatencies, held: document.querySelectorAll('kbd.down').length,"
                               " chunks: window.__chunks})")
            br.click("#btn-save")
            saved = br.wait_for("window.worldsmith.stats.saved")
            archive = br.wait_download(".zip")
            shot = br.screenshot(tmp_path / "page.png")
    finally:
        uv.should_exit = True
        thread.join(timeout=10)

    # Frames arrived (every announced frame), were shown, and key presses were answered on screen.
    chunks = page["chunks"]
    assert page["received"] == sum(c["frames"] for c in chunks) > 0 and page["shown"] > 0
    assert len(page["keyLat"]) >= 2 and all(0 < t < 20_000 for t in page["keyLat"]) and page["held"] == 0
    assert shot.stat().st_size > 10_000

    # The download: the browser saved the zip; the path it holds moved the way the keys said.
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "dl")
    stem = f"take{saved['take']}"
    folder = tmp_path / "dl" / stem
    sidecar = json.loads((folder / f"{stem}.json").read_text())
    poses = json.loads((folder / f"{stem}_pose.json").read_text())
    c2w = torch.tensor([poses[str(i)]["extrinsic"] for i in range(len(poses))], dtype=torch.float64)
    actions = [lat["action_id"] for lat in sidecar["latents"]]
    assert len(actions) == c2w.shape[0] == 4 * len(sidecar["serve"]["chunks"])
    start = 0
    for chunk in sidecar["serve"]["chunks"]:
        n = len(chunk["action_ids"])
        ids, seg = actions[start: start + n], c2w[max(0, start - 1): start + n]
        rel = torch.linalg.inv(seg[:-1]) @ seg[1:]  # motion of each new latent in the previous camera's frame
        if chunk["keys"] == ["w"]:
            assert set(ids) - {0} == {W_ID}
            assert torch.all(rel[:, 2, 3] > 0.05) and torch.allclose(rel[:, :3, :3], torch.eye(3, dtype=torch.float64).expand_as(rel[:, :3, :3]))
        elif chunk["keys"] == ["right"]:
            assert set(ids) == {RIGHT_ID}
            yaw = torch.rad2deg(torch.atan2(rel[:, 0, 2], rel[:, 2, 2]))  # + = forward axis turned towards +x (right)
            assert torch.all(yaw > 1.0) and torch.all(rel[:, :3, 3].abs() < 1e-9)
        elif chunk["keys"] == []:
            assert set(ids) == {0}
        start += n
    z = c2w[:, 2, 3]
    assert z[-1] > 0.3 and sidecar["latents"][-1]["keys"] == [] and KEY_NAMES[4] == "yaw_right"
    assert any(lat["keys"] == ["yaw_right"] for lat in sidecar["latents"])

    # Replay the downloaded pose JSON (and start image) through python -m infer: the same action ids.
    out = tmp_path / "replay" / "replay.mp4"
    argv = ["--bundle", str(bundle), "--image", str(folder / f"{stem}_start.png"), "--pose", str(folder / f"{stem}_pose.json"),
            "--out", str(out), "--seed", "0", "--quiet", "--device", "cpu"]
    assert infer_main(argv) == 0
    replay = json.loads(out.with_suffix(".json").read_text())
    assert [lat["action_id"] for lat in replay["latents"]] == actions
    got = torch.tensor([lat["c2w"] for lat in replay["latents"]], dtype=torch.float64)
    torch.testing.assert_close(got, c2w, rtol=0, atol=1e-9)
    assert math.isclose(replay["video"]["frames"], sidecar["video"]["frames"])
    assert sidecar["serve"]["replay"].startswith(f"python -m infer --bundle {bundle} --image {stem}_start.png --pose {stem}_pose.json")
