"""The benchmark CLI runs end to end (on tiny shapes) and writes its JSON and plot."""

import json

from bench.__main__ import main


def test_cli_writes_json_and_plot(tmp_path, capsys):
    main(["--preset", "tiny", "--repeats", "1", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".png").exists()
    run = json.loads(json_path.read_text())
    ok = {(r["suite"], r["provider"], r["mode"]) for r in run["results"] if r["status"] == "ok"}
    for provider in ("fused", "eager"):
        assert {("logits", provider, m) for m in ("fwd", "fwd_bwd", "logprobs")} <= ok
        assert {("linear", provider, m) for m in ("fwd_bwd", "logprobs", "logprobs_grad")} <= ok
    for r in run["results"]:
        if r["status"] == "ok":
            assert r["median_ms"] > 0
            assert (r["gbps"] > 0) if r["suite"] == "logits" else (r["tflops"] > 0)
        if r["agreement_with_fused"] is not None:
            assert not r["status"].startswith("disagrees"), r
    assert "provider" in capsys.readouterr().out
