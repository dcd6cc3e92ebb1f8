"""``--conf localiser`` and ``--conf localiser_margin`` as the app reads them at start: the shipped
file by default where it exists, ``none`` to switch it off, and a clear refusal of a missing file
or a nonsense margin before any request is served."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

from tests.support.paths import APP_DIR, PYTHON, REPO


def test_the_app_finds_the_shipped_localiser_and_refuses_bad_settings_at_start(tmp_path, small_model):
    bare, shipped = tmp_path / "bare", tmp_path / "shipped"
    for d in (bare, shipped):
        d.mkdir()
        shutil.copyfile(small_model, d / "pretrained_classify_nodule.pt")
    shutil.copyfile(APP_DIR / "model" / "pretrained_nodule_localiser.pt", shipped / "pretrained_nodule_localiser.pt")
    cases = {"bare": (bare, {}), "shipped": (shipped, {}), "off": (shipped, {"localiser": "none"}),
             "missing": (shipped, {"localiser": str(tmp_path / "nowhere.pt")}),
             "negative margin": (shipped, {"localiser_margin": "-0.5"}), "margin": (shipped, {"localiser_margin": "0.5"})}
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(APP_DIR)!r})
        from lib.configs.classify_nodule import ClassifyNoduleConfig
        out = {{}}
        for name, (model_dir, conf) in json.loads(sys.argv[1]).items():
            config = ClassifyNoduleConfig()
            try:
                config.init("classify_nodule", model_dir, {{"model_dir": model_dir, **conf}}, None)
                args = config.infer().predictor_args
                out[name] = {{"path": args["localiser_path"], "margin": args["localiser_margin"]}}
            except ValueError as e:
                out[name] = {{"error": str(e)}}
        print(json.dumps(out))
    """)
    run = subprocess.run([str(PYTHON), "-c", code, json.dumps({k: [str(d), c] for k, (d, c) in cases.items()})], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["bare"] == {"path": None, "margin": 0.25}  # no file beside the model: whole frames
    assert out["shipped"] == {"path": str(shipped / "pretrained_nodule_localiser.pt"), "margin": 0.25}
    assert out["off"]["path"] is None
    assert "no such file" in out["missing"]["error"] and "nowhere.pt" in out["missing"]["error"]
    assert "localiser_margin" in out["negative margin"]["error"]
    assert out["margin"]["margin"] == 0.5
