"""The benchmark CLI runs end to end (on tiny shapes) and writes its JSON and plot."""

import json

from bench.__main__ import main


def test_cli_writes_json_and_plot(tmp_path, capsys):
    main(["--preset", "tiny", "--repeats", "1", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".png").exists()
    run = json.loads(json_path.read_text())
    ok = {(r["provider"], r["mode"]) for r in run["results"] if r["status"] == "ok"}
    assert {("fused", m) for m in ("fwd", "fwd_bwd", "logprobs")} <= ok
    assert {("eager", m) for m in ("fwd", "fwd_bwd", "logprobs")} <= ok
    for r in run["results"]:
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["gbps"] > 0 and r["bytes_model"] > 0
    assert "provider" in capsys.readouterr().out
